"""Distributed training on this CPU: tokens/s and memory per rank for 1 process and for 2 processes with DDP, FSDP2
(tuneloop's `fully_shard` over gloo) and DeepSpeed ZeRO-3, same rows, same per-device batch, same steps.

Model: the bundled SmolLM2-135M-Instruct, LoRA r=16 all-linear. Rows: SST-2 train sentences (../shared/data/sst2) as
instruction rows, packed to 256 tokens. Each variant is a real `tuneloop train` (torchrun for 2 processes); peak
memory comes from each rank's report (runs/<id>/ranks/), tokens/s from the run summary (summed over ranks, training
time only). Peak memory includes loading the whole base model in every process before it is sharded; the
resident memory at the end is the steady state. On 2 cores, 2 processes share the machine: the point is the per-rank memory and that it runs, not
speed-up.

    .venv/bin/python benchmarks/distributed.py [--steps 10] [--rows 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import sst2
from tuneloop.artifacts.training import RankReport
from tuneloop.workspace import Workspace

VARIANTS = {
    "1 process": ("ddp", 1),
    "2 x DDP": ("ddp", 2),
    "2 x FSDP2": ("fsdp", 2),
    "2 x DeepSpeed ZeRO-3": ("deepspeed_zero3", 2),
}


def config(steps: int, rows: int, strategy: str) -> dict[str, Any]:
    return {
        "project": {"name": "bench-distributed"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {
            "sources": [sst2.source(rows)],
            "max_seq_len": 256,
            "packing": True,
            "val_fraction": 0.05,
        },
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "eval_every": steps,
            "save_every": steps,
            "keep_best": False,
            "report_to": [],
            "distributed": strategy,
        },
    }


def run(name: str, workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    strategy, processes = VARIANTS[name]
    path = workdir / f"{strategy}-{processes}.yaml"
    path.write_text(yaml.safe_dump(config(steps, rows, strategy)))
    result = subprocess.run(
        [sys.executable, "-m", "tuneloop.cli", "train", "-c", str(path), "--nproc", str(processes), "--json"],
        env={**os.environ, "TUNELOOP_HOME": str(workdir / "ws")},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout)
    run = Workspace(workdir / "ws").run(summary["run_id"])
    ranks = [RankReport.load(run.rank_report(rank)).model_dump() for rank in range(processes)]
    peaks = [rank["peak_memory_mb"] for rank in ranks] or [summary["peak_memory_mb"]]
    steady = [rank["resident_mb_at_end"] for rank in ranks]
    held = [rank["trainable_local"] + rank["frozen_local"] for rank in ranks]
    return {
        "variant": name,
        "tokens_per_second": summary["tokens_per_second"],
        "peak_mb_per_rank": max(peaks),
        "end_mb_per_rank": max(steady),
        "parameters_per_rank": max(held) if held else None,
        "train_loss": summary["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=400)
    args = parser.parse_args()
    from tuneloop.device import cpu_description

    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="tl-bench-dist-") as scratch:
        rows = [run(name, Path(scratch), args.steps, args.rows) for name in VARIANTS]
    baseline = rows[0]
    print(
        "\n| variant | tokens/s | vs 1 process | peak MiB per rank | MiB per rank at end | parameters per rank | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        held = "-" if row["parameters_per_rank"] is None else f"{row['parameters_per_rank']:,}"
        print(
            f"| {row['variant']} | {row['tokens_per_second']:,.0f} | "
            f"{row['tokens_per_second'] / baseline['tokens_per_second']:.2f}x | {row['peak_mb_per_rank']:,.0f} | "
            f"{row['end_mb_per_rank']:,.0f} | {held} | {row['train_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
