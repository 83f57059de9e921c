"""Experiment tracking in MLflow: params, per-step metrics, the data fingerprint and the run's artifacts.

Default store: SQLite in the workspace (`mlflow.db`, artifacts under `mlartifacts/`); `registry.tracking_uri` or
$MLFLOW_TRACKING_URI point at any other MLflow server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tuneloop.workspace import Workspace


def tracking_uri(workspace: Workspace, configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace.root / 'mlflow.db'}"


def setup_mlflow(workspace: Workspace, configured_uri: str | None, experiment: str) -> tuple[Any, str]:
    """A client for the store and the experiment id (created with a workspace artifact folder).

    An explicit client, not `mlflow.set_tracking_uri`: that one also sets $MLFLOW_TRACKING_URI for the whole process,
    which would send later runs with another workspace to this store."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = tracking_uri(workspace, configured_uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    artifact_location = (workspace.root / "mlartifacts" / experiment).as_uri() if uri.startswith("sqlite") else None
    try:
        return client, client.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:  # created by a concurrent run meanwhile
        return client, client.get_experiment_by_name(experiment).experiment_id


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


class MlflowCallback(TrainerCallback):
    """Logs from the main process only; resumes the same MLflow run when training resumes."""

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        mlflow_run_id: str | None = None,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.params = params
        self.tags = tags
        self.run_id = mlflow_run_id

    def start(self) -> str:
        """Create (or reopen) the MLflow run; called before training so the id can be stored for resume."""
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            params = {key: str(value)[:6000] for key, value in self.params.items()}
            items = list(params.items())
            from mlflow.entities import Param

            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        return self.run_id

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key.replace("/", "_"), float(value), now, state.global_step)
            for key, value in logs.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, artifacts: list[Path], status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        for path in artifacts:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)
