"""Quality gates: `METRIC: x` (value >= x), `METRIC_max: x` (value <= x), `METRIC_improvement: x` (relative
improvement over the comparison model >= x; lower is better for perplexity, loss, toxicity and latency)."""

from __future__ import annotations

from typing import Any

from tuneloop.errors import ConfigError

LOWER_IS_BETTER = (
    "perplexity",
    "mean_nll",
    "toxicity_rate",
    "redteam_toxic_rate",
    "ttft_s",
    "repetition_rate",
    "max_tokens_hit_rate",
)


def check_gates(
    gates: dict[str, float], metrics: dict[str, float], baseline: dict[str, float] | None
) -> dict[str, Any]:
    """Returns gate -> {"result": "pass"|"fail", "value", "threshold", "rule"}."""
    results: dict[str, Any] = {}
    for gate, threshold in gates.items():
        if gate.endswith("_improvement"):
            name = gate[: -len("_improvement")]
            if baseline is None or name not in baseline:
                raise ConfigError(
                    f"eval.gates.{gate} needs a comparison model with {name!r}",
                    hint="evaluate with --compare (default: base) and include the metric",
                )
            value = _metric(metrics, name, gate)
            before = baseline[name]
            improvement = (before - value) / before if name in LOWER_IS_BETTER else (value - before) / abs(before or 1)
            results[gate] = _result(
                improvement >= threshold, improvement, threshold, f"relative improvement >= {threshold}"
            )
        elif gate.endswith("_max"):
            value = _metric(metrics, gate[: -len("_max")], gate)
            results[gate] = _result(value <= threshold, value, threshold, f"<= {threshold}")
        else:
            value = _metric(metrics, gate, gate)
            results[gate] = _result(value >= threshold, value, threshold, f">= {threshold}")
    return results


def _metric(metrics: dict[str, float], name: str, gate: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"eval.gates.{gate}: metric {name!r} was not computed",
            hint=f"computed metrics: {', '.join(sorted(metrics))}; add its group to eval.metrics",
        )
    return float(metrics[name])


def _result(passed: bool, value: float, threshold: float, rule: str) -> dict[str, Any]:
    return {"result": "pass" if passed else "fail", "value": value, "threshold": threshold, "rule": rule}
