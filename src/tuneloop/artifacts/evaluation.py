"""An evaluation's `metrics.json`: per-model metrics, gate results, the judge's summary and where the report is."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tuneloop.artifacts._json import JsonArtifact
from tuneloop.workspace import RunPaths


class EvalReport(JsonArtifact):
    models: dict[str, str] = Field(description="Label (`tuned`, `base`, ...) -> the reference evaluated.")
    metrics: dict[str, dict[str, float]] = Field(description="Label -> metric -> value; the first label is gated.")
    details: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Label -> per-class tables etc.")
    gates: dict[str, str] = Field(default_factory=dict, description="Gate -> `pass` | `fail`.")
    gate_details: dict[str, dict[str, Any]] = Field(default_factory=dict)
    passed: bool
    rows: int
    data: str = Field(description="Which rows were evaluated.")
    report: str = Field(description="The HTML report.")
    dir: str = Field(description="The report folder.")
    pairwise: dict[str, str] | None = Field(None, description="Blind A/B sheet files, when asked for.")
    outputs: str | None = Field(None, description="outputs.jsonl: every evaluated row with each model's answer.")
    judge: dict[str, Any] | None = Field(
        None, description="The LLM judge's summary (`--judge`): pairs, grade means, unparsed replies, judge.jsonl."
    )
    significance: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Metric -> paired test of the evaluated model against the baseline on the same rows: "
        "`difference`, `ci95`, `p_value`, `test` (McNemar or paired bootstrap), `significant` (p < 0.05), `n`.",
    )

    @property
    def primary(self) -> dict[str, float]:
        """The metrics of the evaluated model (the first label)."""
        return next(iter(self.metrics.values()), {})

    @classmethod
    def latest(cls, run: RunPaths) -> EvalReport | None:
        """The run's newest evaluation report, if any."""
        reports = run.eval_reports()
        return cls.load(reports[-1].metrics) if reports else None
