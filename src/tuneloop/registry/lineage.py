"""Lineage of a registered version: everything needed to know where a model came from and to rebuild it."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from tuneloop.artifacts.dataset import DatasetManifest
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.lineage import (
    BaseModelLineage,
    DataLineage,
    EvaluationLineage,
    Lineage,
    SourceLineage,
    TrainingLineage,
)
from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.workspace import RunPaths, Workspace

LIBRARIES = ("tuneloop", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "mlflow")


def collect_lineage(run: RunPaths, workspace: Workspace) -> Lineage:
    """Read from the run's own files: its result (which records the resolved base and its weights' hash), config,
    record, newest evaluation, and the dataset manifest when the dataset is still in the workspace."""
    result = TrainResult.load(run.summary)
    config = json.loads(run.config.read_text(encoding="utf-8"))
    record = RunRecord.load(run.record)
    dataset = workspace.dataset(result.dataset_id)
    manifest = DatasetManifest.load(dataset.manifest) if dataset.manifest.exists() else None
    evaluation = latest_eval(run)
    artifact = result.output
    training = TrainingLineage.model_validate(result.model_dump())
    return Lineage(
        run_id=result.run_id,
        mlflow_run_id=record.mlflow_run_id,
        method=result.method,
        base_model=BaseModelLineage(
            reference=result.base_model, folder=_base_folder(artifact), weights_sha256=result.base_weights_sha256
        ),
        data=DataLineage(
            fingerprint=result.dataset_id,
            sources=[
                SourceLineage(path=source.path, format=source.format, rows=source.rows_read)
                for source in (manifest.sources if manifest else [])
            ],
            source_sha256=manifest.source_hashes if manifest else [],
            counts=manifest.counts.model_dump() if manifest else {},
            kind=manifest.kind if manifest else "sft",
            provenance=manifest.provenance if manifest else {},
        ),
        config=config,
        training=training,
        # A run without validation (common for small preference sets) has no eval_loss: left out, not recorded as 0.
        metrics=_flat_eval_metrics(evaluation)
        | {
            name: loss
            for name, loss in (("train_loss", result.train_loss), ("eval_loss", result.eval_loss))
            if loss is not None
        },
        evaluation=evaluation,
        chat_template=_read(artifact / "chat_template.jinja"),
        generation_config=json.loads(_read(artifact / "generation_config.json") or "{}"),
        libraries={name: _version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        git_commit=git_commit(),
        artifact=str(artifact),
        parent=result.parent,
        preference=result.preference,
    )


def latest_eval(run: RunPaths) -> EvaluationLineage | None:
    report = EvalReport.latest(run)
    return EvaluationLineage.model_validate(report.model_dump()) if report else None


def _flat_eval_metrics(evaluation: EvaluationLineage | None) -> dict[str, float]:
    if not evaluation:
        return {}
    tuned = next(iter(evaluation.metrics.values()), {})
    return {f"eval_{name}": float(value) for name, value in tuned.items()}


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
