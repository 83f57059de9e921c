"""A registered version's `lineage.json`: everything needed to know where a model came from and to rebuild it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tuneloop.artifacts._json import ArtifactPart, JsonArtifact


class BaseModelLineage(ArtifactPart):
    reference: str = Field(description="`model.base` as resolved when training.")
    folder: str | None = Field(
        description="The base weights folder the adapter names (PEFT's base_model_name_or_path)."
    )
    weights_sha256: str


class SourceLineage(ArtifactPart):
    path: str
    format: str
    rows: int


class DataLineage(ArtifactPart):
    fingerprint: str = Field(description="The dataset id.")
    sources: list[SourceLineage] = Field(default_factory=list)
    source_sha256: list[str] = Field(default_factory=list)
    counts: dict[str, Any] = Field(default_factory=dict)
    kind: str = Field("sft", description="`sft` rows or `preference` pairs (DPO/ORPO).")
    provenance: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Each source's sidecar provenance by path, as its generator wrote it (e.g. the feedback window "
        "of `tuneloop data from-feedback`, the teacher of `tuneloop data synth`).",
    )


class TrainingLineage(ArtifactPart):
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens: int
    tokens_per_second: float
    peak_memory_mb: float
    wall_seconds: float
    precision: str
    quantization: str | None


class EvaluationLineage(ArtifactPart):
    """The part of the newest `EvalReport` a version keeps."""

    models: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    gates: dict[str, str] = Field(default_factory=dict)
    passed: bool | None = None
    rows: int | None = None
    data: str | None = None
    report: str | None = None

    @property
    def failed_gates(self) -> list[str]:
        return [gate for gate, result in self.gates.items() if result == "fail"]


class Lineage(JsonArtifact):
    run_id: str
    mlflow_run_id: str | None
    method: str
    base_model: BaseModelLineage
    data: DataLineage
    config: dict[str, Any] = Field(description="The full config the run was trained with.")
    training: TrainingLineage
    metrics: dict[str, float] = Field(description="Flat metrics for diffs: eval_<metric> of the tuned model, losses.")
    evaluation: EvaluationLineage | None
    chat_template: str | None
    generation_config: dict[str, Any] = Field(default_factory=dict)
    libraries: dict[str, str | None] = Field(default_factory=dict)
    git_commit: str | None
    artifact: str = Field(description="The adapter or model folder of the run.")
    parent: dict[str, Any] | None = Field(
        None,
        description="Preference tuning: the model the run started from (`reference`, `run_id`, registry `version`, "
        "`adapter`); None when it started from the base.",
    )
    preference: dict[str, Any] | None = Field(
        None, description="Preference tuning: `beta`, `loss_type`, and what the reference model was."
    )
