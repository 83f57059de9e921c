"""Training and evaluation numbers as Prometheus gauges on the gateway's /metrics, so one Grafana dashboard shows
serving and training: read from the workspace at scrape time (the newest runs only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneloop.monitor.collect import registry_versions, training_runs
from tuneloop.workspace import Workspace


class TrainingCollector(Collector):
    def __init__(self, workspace: Workspace, registry: Callable[[], Any] | None = None) -> None:
        self.workspace = workspace
        self.registry = registry  # opened lazily: MLflow's store is only read when scraped

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loss = GaugeMetricFamily("tuneloop:training_loss", "Last logged training loss per run.", labels=["run_id"])
        eval_loss = GaugeMetricFamily("tuneloop:training_eval_loss", "Final eval loss per run.", labels=["run_id"])
        speed = GaugeMetricFamily(
            "tuneloop:training_tokens_per_second", "Training throughput per finished run.", labels=["run_id"]
        )
        steps = GaugeMetricFamily("tuneloop:training_steps", "Optimizer steps done per run.", labels=["run_id"])
        for run in training_runs(self.workspace):
            labels = [run["run_id"]]
            if run["loss_curve"]:
                loss.add_metric(labels, float(run["loss_curve"][-1][1]))
            if run["eval_loss"] is not None:
                eval_loss.add_metric(labels, float(run["eval_loss"]))
            if run["tokens_per_second"] is not None:
                speed.add_metric(labels, float(run["tokens_per_second"]))
            if run["steps"] is not None:
                steps.add_metric(labels, float(run["steps"]))
        yield from (loss, eval_loss, speed, steps)
        if self.registry is None:
            return
        evaluation = GaugeMetricFamily(
            "tuneloop:eval_metric",
            "Evaluation metrics of registered versions (label: tuned or the comparison model).",
            labels=["name", "version", "label", "metric"],
        )
        for version in registry_versions(self.registry()):
            for label, values in version["metrics"].items():
                for metric, value in values.items():
                    evaluation.add_metric([version["name"], str(version["version"]), label, metric], float(value))
        yield evaluation
