"""Run identity and bookkeeping (`runs/<run_id>/run.json`): which run a `--resume` continues."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.workspace import Workspace, fingerprint

RECORD = "run.json"


@dataclass
class RunRecord:
    run_id: str
    key: str  # fingerprint of what defines the run: train config, base model, dataset
    status: str  # "running" | "failed" | "finished"
    dataset_id: str
    created_at: str
    mlflow_run_id: str | None = None
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        temporary = run_dir / f".{RECORD}.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        temporary.replace(run_dir / RECORD)

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        return cls(**json.loads((run_dir / RECORD).read_text(encoding="utf-8")))


def run_key(train_section: dict[str, Any], base_model: str, dataset_id: str) -> str:
    return fingerprint({key: value for key, value in train_section.items() if key != "sweep"}, base_model, dataset_id)


def new_run_id(project: str, key: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", project.lower()).strip("-")[:40] or "run"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"


def last_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        return None
    found = get_last_checkpoint(str(checkpoints))
    return Path(found) if found else None


def find_resumable(workspace: Workspace, key: str) -> RunRecord | None:
    """The newest unfinished run with the same key that has a checkpoint."""
    candidates = []
    for record_path in workspace.runs.glob(f"*/{RECORD}"):
        record = RunRecord.load(record_path.parent)
        if record.key == key and record.status != "finished" and last_checkpoint(record_path.parent) is not None:
            candidates.append(record)
    return max(candidates, key=lambda record: record.created_at, default=None)


def find_finished(workspace: Workspace, key: str) -> RunRecord | None:
    """The newest finished run with the same key (its results can be reused as they are)."""
    candidates = []
    for record_path in workspace.runs.glob(f"*/{RECORD}"):
        record = RunRecord.load(record_path.parent)
        if record.key == key and record.status == "finished" and (record_path.parent / "summary.json").exists():
            candidates.append(record)
    return max(candidates, key=lambda record: record.created_at, default=None)
