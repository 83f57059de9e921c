"""Lineage of a registered version: everything needed to know where a model came from and to rebuild it."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneloop.config import LoopConfig
from tuneloop.models import base_weights_fingerprint, resolve_base
from tuneloop.workspace import Workspace

LIBRARIES = ("tuneloop", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "mlflow")


def collect_lineage(run_dir: Path, workspace: Workspace) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    artifact = Path(summary["adapter_path"] or summary["model_path"])
    dataset_dir = workspace.dataset_dir(summary["dataset_id"])
    manifest = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8")) if dataset_dir.exists() else {}
    loop = LoopConfig.model_validate(config)
    base = resolve_base(loop.model.base, workspace)
    evaluation = latest_eval(run_dir)
    return {
        "run_id": summary["run_id"],
        "mlflow_run_id": run.get("mlflow_run_id"),
        "method": summary["method"],
        "base_model": {
            "reference": loop.model.base,
            "folder": _base_folder(artifact),
            "weights_sha256": base_weights_fingerprint(base),
        },
        "data": {
            "fingerprint": summary["dataset_id"],
            "sources": [
                {"path": source.get("path"), "format": source.get("format"), "rows": source.get("rows_read")}
                for source in manifest.get("sources", [])
            ],
            "source_sha256": manifest.get("fingerprint_inputs", {}).get("sources", []),
            "counts": manifest.get("counts", {}),
        },
        "config": config,
        "training": {
            key: summary[key]
            for key in (
                "train_loss",
                "eval_loss",
                "steps",
                "tokens",
                "tokens_per_second",
                "peak_memory_mb",
                "wall_seconds",
                "precision",
                "quantization",
            )
        },
        "metrics": _flat_eval_metrics(evaluation)
        | {"train_loss": summary["train_loss"] or 0.0, "eval_loss": summary["eval_loss"] or 0.0},
        "evaluation": evaluation,
        "chat_template": _read(artifact / "chat_template.jinja"),
        "generation_config": json.loads(_read(artifact / "generation_config.json") or "{}"),
        "libraries": {name: _version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        "git_commit": git_commit(),
        "artifact": str(artifact),
    }


def latest_eval(run_dir: Path) -> dict[str, Any] | None:
    reports = sorted((run_dir / "eval").glob("*/metrics.json")) if (run_dir / "eval").exists() else []
    if not reports:
        return None
    data = json.loads(reports[-1].read_text(encoding="utf-8"))
    return {key: data[key] for key in ("models", "metrics", "gates", "passed", "rows", "data", "report") if key in data}


def _flat_eval_metrics(evaluation: dict[str, Any] | None) -> dict[str, float]:
    if not evaluation:
        return {}
    tuned = next(iter(evaluation["metrics"].values()), {})
    return {f"eval_{name}": float(value) for name, value in tuned.items() if isinstance(value, int | float)}


def _base_folder(artifact: Path) -> str | None:
    adapter_config = artifact / "adapter_config.json"
    if adapter_config.exists():
        return json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return None


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None
