"""What the dashboard and the training metrics exporter show, read from the workspace and the gateway's metrics:
training runs with their loss curves, registry versions with eval tables and aliases, live serving statistics and
A/B variants with preference rates."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.errors import TuneloopError
from tuneloop.workspace import RunPaths, Workspace

MAX_RUNS = 20
LATENCY_BUCKETS = {
    "tuneloop:time_to_first_token_seconds_bucket": "ttft",
    "tuneloop:e2e_request_latency_seconds_bucket": "e2e",
}


def training_runs(workspace: Workspace, limit: int = MAX_RUNS) -> list[dict[str, Any]]:
    """Newest first: id, status, method, steps, tokens/s, losses and the loss curve of each run."""
    runs = []
    for run_id in workspace.run_ids():
        paths = workspace.run(run_id)
        record = _load(RunRecord, paths.record)
        result = _load(TrainResult, paths.summary)
        history = _history(paths)
        runs.append(
            {
                "run_id": run_id,
                "status": record.status if record else "unknown",
                "created_at": record.created_at if record else "",
                "method": result.method if result else None,
                "steps": result.steps if result else (history[-1].get("step") if history else None),
                "tokens_per_second": result.tokens_per_second if result else None,
                "wall_seconds": result.wall_seconds if result else None,
                "train_loss": result.train_loss if result else None,
                "eval_loss": result.eval_loss if result else None,
                "loss_curve": [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e],
                "eval_curve": [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e],
            }
        )
    runs.sort(key=lambda run: run["created_at"], reverse=True)
    return runs[:limit]


def _history(paths: RunPaths) -> list[dict[str, Any]]:
    """The finished run's log history, else the newest checkpoint's (a run in progress)."""
    history = _json(paths.history)
    if history is not None:
        return history
    # A run in progress: Transformers' own checkpoint layout.
    states = sorted(
        paths.checkpoints.glob("checkpoint-*/trainer_state.json"),
        key=lambda path: int(path.parent.name.split("-")[-1]),
    )
    return (_json(states[-1]) or {}).get("log_history", []) if states else []


def registry_versions(registry: Any) -> list[dict[str, Any]]:
    """Every registered version: aliases, run, gates passed, and the eval table (label -> metric -> value)."""
    versions = []
    for name in registry.names():
        for info in reversed(registry.versions(name)):
            evaluation = info.lineage.evaluation if info.lineage else None
            versions.append(
                {
                    "name": info.name,
                    "version": info.version,
                    "aliases": info.aliases,
                    "run_id": info.run_id,
                    "eval_passed": info.eval_passed,
                    "created_at": info.created_at,
                    "metrics": evaluation.metrics if evaluation else {},
                    "gates": evaluation.gates if evaluation else {},
                }
            )
    return versions


def serving_stats(metrics_registry: Any, started_at: float) -> list[dict[str, Any]]:
    """Per model and variant: requests, errors, generated tokens, tokens/s since start, TTFT and end-to-end
    latency percentiles (estimated from the histogram buckets, as Prometheus' histogram_quantile does)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    buckets: dict[tuple[str, tuple[str, str]], list[tuple[float, float]]] = {}

    def row(labels: dict[str, str]) -> dict[str, Any]:
        key = (labels.get("model", ""), labels.get("variant", ""))
        return rows.setdefault(
            key, {"model": key[0], "variant": key[1], "requests": 0, "errors": 0, "generated_tokens": 0}
        )

    for family in metrics_registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "tuneloop:requests_total":
                entry = row(labels)
                entry["requests"] += int(sample.value)
                entry["errors"] += int(sample.value) if labels.get("status") != "success" else 0
            elif sample.name == "tuneloop:generation_tokens_total":
                row(labels)["generated_tokens"] += int(sample.value)
            elif sample.name in LATENCY_BUCKETS:
                key = (labels.get("model", ""), labels.get("variant", ""))
                buckets.setdefault((LATENCY_BUCKETS[sample.name], key), []).append((float(labels["le"]), sample.value))
    uptime = max(time.time() - started_at, 1e-9)
    for (kind, key), points in buckets.items():
        if key in rows:
            for quantile in (0.5, 0.95, 0.99):
                rows[key][f"{kind}_p{round(quantile * 100)}_s"] = histogram_quantile(quantile, points)
    for entry in rows.values():
        entry["tokens_per_second"] = round(entry["generated_tokens"] / uptime, 2)
    return sorted(rows.values(), key=lambda entry: (entry["model"], entry["variant"]))


def sample_value(metrics_registry: Any, name: str) -> float | None:
    """The value of an unlabelled sample (a gauge) in a Prometheus registry."""
    for family in metrics_registry.collect():
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def histogram_quantile(quantile: float, points: list[tuple[float, float]]) -> float | None:
    """Linear interpolation inside the bucket holding the quantile (Prometheus' method); None without data."""
    points = sorted(points)
    total = points[-1][1] if points else 0
    if total <= 0:
        return None
    rank = quantile * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in points:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / (count - previous_count) if count > previous_count else 0
            return round(previous_bound + (bound - previous_bound) * share, 4)
        previous_bound, previous_count = bound, count
    return previous_bound


def _load(artifact: Any, path: Path) -> Any:
    """An artifact, or None while it is missing or being written (the dashboard shows what it can)."""
    try:
        return artifact.load(path) if path.exists() else None
    except TuneloopError:
        return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
