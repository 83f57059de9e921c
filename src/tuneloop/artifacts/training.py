"""A training run's two files: the run record (written from the start) and the result (written when it finished)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tuneloop.artifacts._json import JsonArtifact

RunStatus = Literal["running", "failed", "pruned", "finished"]


class RunRecord(JsonArtifact):
    """`run.json`: which run a `--resume` continues, and its MLflow run (so a resumed run logs into the same one)."""

    run_id: str
    key: str = Field(description="`keys.run_key`: train config, base weights, dataset.")
    status: RunStatus
    dataset_id: str
    created_at: str
    mlflow_run_id: str | None = None
    attempts: int = 1


class TrainResult(JsonArtifact):
    """`summary.json`: what a finished run produced and how it went."""

    run_id: str
    run_dir: str
    method: str
    adapter_path: str | None = Field(description="The PEFT adapter folder (LoRA/QLoRA).")
    model_path: str | None = Field(description="The full model folder (full fine-tuning).")
    base_model: str = Field(description="`model.base` resolved against the config file's folder.")
    base_weights_sha256: str = Field(description="Content hash of the base weights the run started from.")
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens: int = Field(description="Real (non-padding) training tokens, summed over processes.")
    tokens_per_second: float = Field(description="Training tokens/s over training time after the first step.")
    first_step_seconds: float = Field(0.0, description="The first step's time (torch.compile happens in it).")
    compiled: bool = Field(False, description="Whether the decoder layers ran compiled (`train.compile`).")
    peak_memory_mb: float
    wall_seconds: float
    mlflow_run_id: str | None
    dataset_id: str
    precision: str
    quantization: str | None
    resumed_from: str | None
    memory_estimate_mb: float
    model_memory_mb: float
    world_size: int = Field(1, description="Training processes, over all nodes.")
    nodes: int = Field(1, description="Machines the run used (each billed for the whole run in `tuneloop cost`).")
    metric_for_best: str | None = Field(None, description="What keep-best compared (`train.metric_for_best`).")
    best_metric: float | None = Field(None, description="Its value at the kept checkpoint (keep-best on).")
    best_step: int | None = Field(None, description="The step whose checkpoint was kept (keep-best on).")
    parent: dict[str, Any] | None = Field(
        None,
        description="Preference tuning: the model it started from (`reference` as configured, `run_id`, registry "
        "`version`, `adapter`); None for runs that started from the base.",
    )
    preference: dict[str, Any] | None = Field(
        None, description="Preference tuning (DPO/ORPO): `beta`, `loss_type` and what the reference model was."
    )

    @property
    def output(self) -> Path:
        """The adapter folder, or the full model's."""
        return Path(self.adapter_path or self.model_path or "")

    def summary(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class RankReport(JsonArtifact):
    """`ranks/rank-K.json`: one process of a multi-process run, written by every rank at the end of training."""

    rank: int
    world_size: int
    local_rank: int
    host: str
    strategy: str
    trainable_local: int = Field(description="Trainable elements this rank held (its shards under FSDP).")
    frozen_local: int = Field(description="Frozen elements this rank held (its shards under FSDP).")
    trainable_sha256: str = Field(description="Hash of this rank's trainable tensors (equal on all ranks under DDP).")
    tokens: int = Field(description="Real tokens this rank trained on.")
    peak_memory_mb: float = Field(0.0, description="This process's peak resident (CPU) or allocated (GPU) memory.")
    resident_mb_at_end: float = Field(
        0.0, description="Resident memory when training ended: the steady state, without the load-time peak."
    )
