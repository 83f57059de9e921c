"""What `train.eval_generate` (task metrics from generations during training) costs: SmolLM2-135M LoRA on SST-2
rows from ../shared/data, trained with it off (the baseline, measured in the same run) and on, with validation at the
same steps in every variant so the difference is the generation alone.

Variants: `off`; `auto` (eval_generate on `--eval-rows` validation rows every `--every` steps, metrics accuracy with
eval.labels [negative, positive] and exact_match, `max_new_tokens: auto`: the longest reference + 8 tokens); `budget-64`
(the same with `max_new_tokens: 64`, what a task with longer answers pays). Each variant trains in its own process, one
after another. Time columns: wall = the whole `train_model` call; training = optimizer steps (tuneloop's tokens/s
clock, the first step apart); generation = the sum of `eval_generate_seconds` in the log history.

    .venv/bin/python benchmarks/train_eval_generate.py [--rows 400] [--steps 60] [--eval-rows 32] [--every 20]
        [--variants off,auto,budget-64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import sst2

LABELS = ["negative", "positive"]
VARIANTS: dict[str, str] = {
    "off": "eval_generate off (baseline)",
    "auto": "eval_generate, max_new_tokens auto",
    "budget-64": "eval_generate, max_new_tokens 64",
}


def config_for(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    train: dict[str, Any] = {"max_steps": args.steps, "eval_every": args.every, "report_to": []}
    if args.threads:
        train["num_threads"] = args.threads
    if variant != "off":
        train["eval_generate"] = {
            "every": args.every,
            "rows": args.eval_rows,
            "metrics": ["accuracy", "exact_match"],
            "max_new_tokens": 64 if variant == "budget-64" else "auto",
        }
    return {
        "project": {"name": f"bench-eval-generate-{variant}"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [sst2.source(args.rows)], "val_fraction": 0.1},
        "train": train,
        "eval": {"labels": LABELS},
    }


def run_child(variant: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in this process and return its timings and metric curve."""
    from rich.console import Console

    from tuneloop.config_file import load_config
    from tuneloop.train.recipe import train_model
    from tuneloop.workspace import Workspace

    path = workdir / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config_for(variant, args)))
    workspace = Workspace(workdir / "ws")
    result = train_model(load_config(path), workspace, console=Console(stderr=True, quiet=True))
    history = json.loads(workspace.run(result.run_id).history.read_text())
    evaluations = [entry for entry in history if "eval_loss" in entry]
    return {
        "wall_seconds": result.wall_seconds,
        "training_seconds": round(result.tokens / max(result.tokens_per_second, 1e-9), 1),
        "first_step_seconds": result.first_step_seconds,
        "tokens_per_second": result.tokens_per_second,
        "validation_seconds": round(sum(entry["eval_runtime"] for entry in evaluations), 1),
        "generation_seconds": round(sum(entry.get("eval_generate_seconds", 0.0) for entry in evaluations), 1),
        "curve": {
            entry["step"]: {
                name: entry[name] for name in ("eval_loss", "eval_accuracy", "eval_exact_match") if name in entry
            }
            for entry in evaluations
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="SST-2 train rows (10% held out for validation)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--threads", type=int, help="train.num_threads (default: tuneloop's; 1 is steadier when shared)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.workdir), args)))
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_shared(Path(tmp), args)
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--child", variant, "--workdir", tmp, *_passed_on(args)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant}: {results[variant]}", file=sys.stderr)
    print_tables(results, args)


def prepare_shared(workdir: Path, args: argparse.Namespace) -> None:
    """Convert the base model and prepare the rows once, before any variant's clock starts (all variants share
    them)."""
    from rich.console import Console

    from tuneloop.config_file import load_config
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.models import configured_base, materialize
    from tuneloop.workspace import Workspace

    path = workdir / "prepare.yaml"
    path.write_text(yaml.safe_dump(config_for("off", args)))
    config, workspace = load_config(path), Workspace(workdir / "ws")
    materialize(configured_base(config, workspace))
    prepare_dataset(config, workspace, console=Console(stderr=True, quiet=True))


def _passed_on(args: argparse.Namespace) -> list[str]:
    return ["--rows", str(args.rows), "--steps", str(args.steps), "--eval-rows", str(args.eval_rows),
            "--every", str(args.every), *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip


def print_tables(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from tuneloop.device import cpu_description

    console = Console(width=200)
    console.print(f"CPU: {cpu_description()}")
    baseline = results.get("off")
    table = Table(
        title=(
            f"SmolLM2-135M LoRA, {args.rows} SST-2 rows, {args.steps} steps, validation every {args.every}, {args.threads or 'default'} thread(s); task "
            f"metrics on {args.eval_rows} validation rows (measured while the machine was shared)"
        )
    )
    for column in ("variant", "wall s", "vs off", "training s (tokens / tokens/s)", "tokens/s", "validation s (loss + generation)",
                   "generation s", "generation share of wall"):  # fmt: skip
        table.add_column(column)
    for variant, result in results.items():
        table.add_row(
            VARIANTS[variant],
            f"{result['wall_seconds']:.1f}",
            f"{result['wall_seconds'] / baseline['wall_seconds']:.2f}x" if baseline else "-",
            f"{result['training_seconds']:.1f}",
            f"{result['tokens_per_second']:,.0f}",
            f"{result['validation_seconds']:.1f}",
            f"{result['generation_seconds']:.1f}",
            f"{result['generation_seconds'] / result['wall_seconds']:.0%}",
        )
    console.print(table)
    curve = Table(title="Metric curve (validation steps)")
    curve.add_column("variant")
    curve.add_column("step")
    for name in ("eval_loss", "eval_accuracy", "eval_exact_match"):
        curve.add_column(name)
    for variant, result in results.items():
        for step, values in result["curve"].items():
            curve.add_row(
                variant, str(step), *(f"{values[name]:.4f}" if name in values else "-"
                                      for name in ("eval_loss", "eval_accuracy", "eval_exact_match"))
            )  # fmt: skip
    console.print(curve)


if __name__ == "__main__":
    main()
