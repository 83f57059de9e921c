"""`tuneloop train --nproc N`: data-parallel training through `accelerate launch`.

The parent prepares the data and converts the base model once (so the workers only hit caches), picks the run id,
then starts N workers (`python -m tuneloop.train.worker`) that each run the same recipe; Transformers' Trainer does
DDP (gloo on CPU, NCCL on GPUs).
`--accelerate-config` passes an Accelerate config file (FSDP, DeepSpeed ZeRO-2/3; see deploy/accelerate/).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tuneloop.artifacts.training import TrainResult
from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.device import has_gpu
from tuneloop.errors import TuneloopError
from tuneloop.keys import new_run_id
from tuneloop.models import configured_base, materialize
from tuneloop.net import free_port
from tuneloop.train.runs import find_resumable, run_key_for
from tuneloop.workspace import Workspace


def launch_distributed(
    config_file: Path,
    overrides: list[str],
    workspace: Workspace,
    nproc: int,
    resume: bool,
    run_id: str | None,
    accelerate_config: Path | None,
    console: Console,
) -> TrainResult:
    config = load_config(config_file, overrides)
    prepared = prepare_dataset(config, workspace, console=console)
    base = configured_base(config, workspace)
    if base.kind != "hub":
        materialize(base)
    key = run_key_for(config, workspace, prepared.dataset_id)
    if run_id is None and resume:
        found = find_resumable(workspace, key)
        run_id = found.run_id if found else None
    run_id = run_id or new_run_id(config.project.name, key)
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config)]
    else:
        # --multi_gpu selects DDP; without GPUs Accelerate runs it over gloo on the CPU (`--cpu` would start one
        # process only, measured, docs/training.md).
        command += ["--multi_gpu", "--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
    command += [
        "-m",
        "tuneloop.train.worker",
        "-c",
        str(config_file),
        "--run-id",
        run_id,
        "--workspace",
        str(workspace.root),
    ]
    for override in overrides:
        command += ["--set", override]
    if resume:
        command.append("--resume")
    console.print(f"launching {nproc} processes: {' '.join(command[2:])}")
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not has_gpu():
        environment.setdefault("ACCELERATE_USE_CPU", "true")
    # Workers report on stderr; stdout stays the parent's (one table, or one JSON object).
    completed = subprocess.run(command, env=environment, check=False, stdout=_stderr_fileno())
    if completed.returncode != 0:
        raise TuneloopError(
            f"distributed training exited with status {completed.returncode} (run {run_id})",
            hint=f"see the worker output above; resume with `tuneloop train -c {config_file} --nproc {nproc} --resume`",
        )
    return TrainResult.load(workspace.run(run_id).summary)


def _stderr_fileno() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): let the workers inherit
        return None
