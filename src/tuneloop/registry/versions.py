"""Registering runs as versions, promotion with gates, and version diffs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.artifacts.lineage import Lineage
from tuneloop.config import flatten
from tuneloop.errors import TuneloopError
from tuneloop.registry.card import render_model_card
from tuneloop.registry.lineage import collect_lineage
from tuneloop.registry.store import Registry, VersionInfo, validate_name
from tuneloop.workspace import RunPaths


def register_run(registry: Registry, run_ref: str, name: str) -> VersionInfo:
    """Register a finished training run (id or folder) as a new version of `name`."""
    validate_name(name)
    workspace = registry.workspace
    run = RunPaths(Path(run_ref)) if Path(run_ref).is_dir() else workspace.run(run_ref)
    if not run.summary.exists():
        raise TuneloopError(f"{run_ref!r} is not a finished training run", hint=f"runs are in {workspace.runs}")
    lineage = collect_lineage(run, workspace)
    tags = {
        "tuneloop.run_id": lineage.run_id,
        "tuneloop.base_model": lineage.base_model.reference,
        "tuneloop.base_weights_sha256": lineage.base_model.weights_sha256,
        "tuneloop.data_fingerprint": lineage.data.fingerprint,
        "tuneloop.method": lineage.method,
        "tuneloop.git_commit": lineage.git_commit or "",
    }
    if lineage.evaluation is not None:
        tags["tuneloop.eval_passed"] = "true" if lineage.evaluation.passed else "false"
    version = registry.register(
        name,
        _artifact_source(registry, lineage),
        lineage.mlflow_run_id,
        tags,
        description=f"{lineage.method} of {lineage.base_model.reference}, run {lineage.run_id}",
    )
    files = registry.version_dir(name, version)
    lineage.save(files.lineage)
    files.card.write_text(render_model_card(name, version, lineage, registry.config.registry.license), encoding="utf-8")
    if lineage.mlflow_run_id:
        registry.tracker.log_artifacts(lineage.mlflow_run_id, [files.root], under=f"registry/{name}-v{version}")
    return registry.get(f"{name}/{version}")


def ensure_registered(registry: Registry, name: str, run_id: str) -> tuple[VersionInfo, bool]:
    """The version already registered from this run, else a new one; and whether it was registered now."""
    if name in registry.names():
        for info in registry.versions(name):
            if info.run_id == run_id:
                return info, False
    return register_run(registry, run_id, name), True


def _artifact_source(registry: Registry, lineage: Lineage) -> str:
    """The MLflow artifact URI of the run's adapter/model when it was tracked, else its folder."""
    artifact = Path(lineage.artifact)
    if lineage.mlflow_run_id:
        return f"{registry.tracker.run_artifact_uri(lineage.mlflow_run_id)}/{artifact.name}"
    return artifact.resolve().as_uri()


def promote(registry: Registry, name: str, version: int, force: bool, console: Console) -> dict[str, Any]:
    """Make `version` the champion (the old champion becomes `previous`), unless its eval gates failed."""
    info = registry.get(f"{name}/{version}")
    if info.eval_passed is False and not force:
        failed = info.lineage.evaluation.failed_gates if info.lineage and info.lineage.evaluation else []
        raise TuneloopError(
            f"{name}/{version} failed its evaluation gates ({', '.join(failed) or 'see its eval report'}); not promoted",
            hint="improve the model, or pass --force to promote anyway",
        )
    if info.eval_passed is None:
        console.print(f"[yellow]warning:[/] {name}/{version} has no evaluation; promoting without gate results")
    previous = None
    try:
        champion = registry.get(f"{name}@champion")
        previous = champion.version if champion.version != version else None
    except TuneloopError:
        pass
    if previous is not None:
        registry.set_alias(name, previous, "previous")
    registry.set_alias(name, version, "champion")
    return {"name": name, "version": version, "champion": version, "previous": previous, "forced": force}


def diff(registry: Registry, name: str, first: int, second: int) -> dict[str, Any]:
    a, b = registry.get(f"{name}/{first}"), registry.get(f"{name}/{second}")
    return {
        "name": name,
        "versions": [first, second],
        "config": _dict_diff(flatten(a.config), flatten(b.config)),
        "data_fingerprint": {
            "a": a.data_fingerprint,
            "b": b.data_fingerprint,
            "changed": a.data_fingerprint != b.data_fingerprint,
        },
        "base_model": {"a": a.base_model, "b": b.base_model},
        "metrics": {
            key: {
                "a": a.metrics.get(key),
                "b": b.metrics.get(key),
                "delta": (b.metrics[key] - a.metrics[key]) if key in a.metrics and key in b.metrics else None,
            }
            for key in sorted(set(a.metrics) | set(b.metrics))
        },
    }


def _dict_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {key: {"a": a.get(key), "b": b.get(key)} for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}
