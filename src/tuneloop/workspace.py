"""The one place that knows workspace paths and computes fingerprints.

Layout (default `./.tuneloop`, or `$TUNELOOP_HOME`):
    datasets/<dataset_id>/   prepared datasets (train/, val/, quarantine.jsonl, report.*)
    runs/<run_id>/           training runs
    models/<name>/           base models converted from GGUF and cached as safetensors
    cache/                   generated built-in data and other caches
    mlflow.db                the MLflow tracking and registry store
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKSPACE_ENV = "TUNELOOP_HOME"
DEFAULT_WORKSPACE = ".tuneloop"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, override: str | Path | None = None) -> Workspace:
        """`override` (the --workspace option) wins over $TUNELOOP_HOME, which wins over ./.tuneloop."""
        chosen = override or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().resolve())

    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def datasets(self) -> Path:
        return self._dir("datasets")

    @property
    def runs(self) -> Path:
        return self._dir("runs")

    @property
    def models(self) -> Path:
        return self._dir("models")

    @property
    def cache(self) -> Path:
        return self._dir("cache")

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets / dataset_id

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id


def fingerprint(*parts: Any) -> str:
    """A stable sha256 over JSON-able parts (dict keys sorted)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (relative names included)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode("utf-8"))
        digest.update(file_sha256(file).encode("ascii"))
    return digest.hexdigest()
