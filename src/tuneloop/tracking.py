"""The MLflow client: one explicit client per store, never the process-global tracking URI.

A shared service (training logs runs, evaluation logs metrics, the registry registers versions). It imports MLflow
only, not Transformers: `tuneloop registry list` and the dashboard stay light. Training's Trainer callback that logs
through it is `tuneloop.train.callbacks.MlflowCallback`.

Default store: SQLite in the workspace (`mlflow.db`, artifacts under `mlartifacts/`); `registry.tracking_uri` or
$MLFLOW_TRACKING_URI point at any other MLflow server.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.workspace import Workspace


def tracking_uri(workspace: Workspace, configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace.mlflow_db}"


@dataclass
class Tracker:
    """An MLflow client bound to one store and one experiment."""

    client: Any
    experiment_id: str

    @classmethod
    def open(cls, workspace: Workspace, configured_uri: str | None, experiment: str) -> Tracker:
        """The store (created on first use) and the experiment (created with a workspace artifact folder).

        An explicit client, not `mlflow.set_tracking_uri`: that one also sets $MLFLOW_TRACKING_URI for the whole
        process, which would send later runs with another workspace to this store."""
        from mlflow import MlflowClient

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        uri = tracking_uri(workspace, configured_uri)
        if uri.startswith("sqlite"):
            workspace.ensure(workspace.root)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return cls(client, found.experiment_id)
        location = workspace.mlflow_artifacts(experiment).as_uri() if uri.startswith("sqlite") else None
        try:
            return cls(client, client.create_experiment(experiment, artifact_location=location))
        except Exception:
            concurrent = client.get_experiment_by_name(experiment)  # created by a concurrent run meanwhile?
            if concurrent is None:
                raise
            return cls(client, concurrent.experiment_id)

    def start_run(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
        return run_id

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(name.replace("/", "_"), float(value), now, step) for name, value in metrics.items()]
        if entries:
            self.client.log_batch(run_id, metrics=entries)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_artifacts(self, run_id: str, paths: list[Path], under: str | None = None) -> None:
        """Folders keep their name as the artifact path (or go under `under`); files go to the root."""
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path=under or path.name)
            elif path.exists():
                self.client.log_artifact(run_id, str(path))

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_artifact_uri(self, run_id: str) -> str:
        return str(self.client.get_run(run_id).info.artifact_uri).rstrip("/")

    def start_system_metrics(self, run_id: str, *, resume: bool = False) -> SystemMetrics:
        """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network; per GPU
        utilisation, memory and power through NVML where `nvidia-ml-py` finds a GPU) logged into `run_id` by a
        background thread every SYSTEM_METRICS_INTERVAL_S ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)
        until `stop()`. What `mlflow.start_run(log_system_metrics=True)` does, for this explicit client's store."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "started", "no GPU": not news
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=resume,  # a resumed run continues its system/* steps
            tracking_uri=self.client.tracking_uri,
        )
        monitor.start()
        return SystemMetrics(monitor)


#: seconds between system-metric samples of a training run (MLflow's default too)
SYSTEM_METRICS_INTERVAL_S = 10.0


@dataclass
class SystemMetrics:
    """A running MLflow SystemMetricsMonitor."""

    monitor: Any

    def stop(self) -> None:
        """Stop the thread, then log one last sample: MLflow's thread drops the interval in progress, so a run
        shorter than one interval would otherwise have no system metrics at all."""
        self.monitor.finish()
        self.monitor.collect_metrics()
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()
