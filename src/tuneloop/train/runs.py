"""Run bookkeeping: which run a `--resume` continues, which finished run `tuneloop run` reuses, and the run record.

A run is identified by `keys.run_key` (train config, base weights, dataset); its record (`RunRecord`, run.json) is
written before training starts, so a crashed run can be found and resumed.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.keys import new_run_id, run_key
from tuneloop.models import base_weights_fingerprint, configured_base
from tuneloop.workspace import RunPaths, Workspace


def run_key_for(config: LoopConfig, workspace: Workspace, dataset_id: str) -> str:
    """The run key of `config` on a prepared dataset (resolves the base model and hashes its weights)."""
    return run_key(
        config, base_weights_fingerprint(configured_base(config, workspace), workspace.content_hashes), dataset_id
    )


def open_run(
    config: LoopConfig,
    workspace: Workspace,
    base_weights: str,
    dataset_id: str,
    resume: bool,
    run_id: str | None,
    console: Console,
) -> tuple[RunRecord, Path | None]:
    """The run to train into and the checkpoint to resume from: the named run, the newest resumable run with the
    same key (`resume`), or a new run."""
    key = run_key(config, base_weights, dataset_id)
    if run_id is not None and workspace.run(run_id).record.exists():
        paths = workspace.run(run_id)
        record = RunRecord.load(paths.record)
        if record.key != key:
            raise TuneloopError(
                f"run {run_id} was started with another config, base model or dataset (run key {record.key[:12]}, "
                f"this config {key[:12]}): its checkpoints do not fit",
                hint="use a new --run-id for this config, or the config the run was started with",
            )
        if record.status == "finished" and paths.summary.exists():
            raise TuneloopError(
                f"run {run_id} has already finished", hint="use a new --run-id to train again (e.g. a new job id)"
            )
        checkpoint = last_checkpoint(paths) if resume else None
        record.attempts += 1
        record.status = "running"
        return record, checkpoint
    if resume and run_id is None:
        found = find_resumable(workspace, key)
        if found is not None:
            found.attempts += 1
            found.status = "running"
            return found, last_checkpoint(workspace.run(found.run_id))
        console.print(
            "[yellow]nothing to resume for this config (no unfinished run with a checkpoint); starting a new run[/]"
        )
    record = RunRecord(
        run_id=run_id or new_run_id(config.project.name, key),
        key=key,
        status="running",
        dataset_id=dataset_id,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return record, None


def last_checkpoint(paths: RunPaths) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not paths.checkpoints.is_dir():
        return None
    found = get_last_checkpoint(str(paths.checkpoints))
    return Path(found) if found else None


def _records(workspace: Workspace) -> list[RunRecord]:
    return [RunRecord.load(workspace.run(run_id).record) for run_id in workspace.run_ids()]


def find_resumable(workspace: Workspace, key: str) -> RunRecord | None:
    """The newest unfinished run with the same key that has a checkpoint."""
    candidates = [
        record
        for record in _records(workspace)
        if record.key == key
        and record.status in ("running", "failed")  # a pruned trial is over, not interrupted
        and last_checkpoint(workspace.run(record.run_id))
    ]
    return max(candidates, key=lambda record: record.created_at, default=None)


def find_finished(workspace: Workspace, key: str) -> TrainResult | None:
    """The result of the newest finished run with the same key (reused as it is)."""
    candidates = [
        record
        for record in _records(workspace)
        if record.key == key and record.status == "finished" and workspace.run(record.run_id).summary.exists()
    ]
    newest = max(candidates, key=lambda record: record.created_at, default=None)
    return TrainResult.load(workspace.run(newest.run_id).summary) if newest else None
