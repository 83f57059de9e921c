"""Registering runs as versions, promotion with gates, and version diffs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.errors import TuneloopError
from tuneloop.registry.card import render_model_card
from tuneloop.registry.lineage import collect_lineage
from tuneloop.registry.store import Registry, VersionInfo, validate_name


def register_run(registry: Registry, run_ref: str, name: str) -> VersionInfo:
    """Register a finished training run (id or folder) as a new version of `name`."""
    validate_name(name)
    workspace = registry.workspace
    run_dir = workspace.run_dir(run_ref) if not Path(run_ref).is_dir() else Path(run_ref)
    if not (run_dir / "summary.json").exists():
        raise TuneloopError(f"{run_ref!r} is not a finished training run", hint=f"runs are in {workspace.runs}")
    lineage = collect_lineage(run_dir, workspace)
    source = _artifact_source(registry, lineage)
    tags = {
        "tuneloop.run_id": lineage["run_id"],
        "tuneloop.base_model": lineage["base_model"]["reference"],
        "tuneloop.base_weights_sha256": lineage["base_model"]["weights_sha256"],
        "tuneloop.data_fingerprint": lineage["data"]["fingerprint"],
        "tuneloop.method": lineage["method"],
        "tuneloop.git_commit": lineage["git_commit"] or "",
    }
    if lineage["evaluation"] is not None:
        tags["tuneloop.eval_passed"] = "true" if lineage["evaluation"].get("passed") else "false"
    version = registry.register(
        name,
        source,
        lineage["mlflow_run_id"],
        tags,
        description=f"{lineage['method']} of {lineage['base_model']['reference']}, run {lineage['run_id']}",
    )
    folder = registry.version_dir(name, version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lineage.json").write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
    (folder / "README.md").write_text(
        render_model_card(name, version, lineage, registry.config.registry.license), encoding="utf-8"
    )
    if lineage["mlflow_run_id"]:
        registry.client.log_artifacts(
            lineage["mlflow_run_id"], str(folder), artifact_path=f"registry/{name}-v{version}"
        )
    return registry.get(f"{name}/{version}")


def _artifact_source(registry: Registry, lineage: dict[str, Any]) -> str:
    """The MLflow artifact URI of the run's adapter/model when it was tracked, else its folder."""
    artifact = Path(lineage["artifact"])
    if lineage["mlflow_run_id"]:
        run = registry.client.get_run(lineage["mlflow_run_id"])
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact.name}"
    return artifact.resolve().as_uri()


def promote(registry: Registry, name: str, version: int, force: bool, console: Console) -> dict[str, Any]:
    """Make `version` the champion (the old champion becomes `previous`), unless its eval gates failed."""
    info = registry.get(f"{name}/{version}")
    if info.eval_passed is False and not force:
        failed = [
            gate for gate, result in (info.lineage.get("evaluation") or {}).get("gates", {}).items() if result == "fail"
        ]
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
        "config": _dict_diff(_flatten(a.config), _flatten(b.config)),
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


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _dict_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {key: {"a": a.get(key), "b": b.get(key)} for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}
