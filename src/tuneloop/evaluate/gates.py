"""Quality gates: `METRIC: x` (value >= x), `METRIC_max: x` (value <= x), `METRIC_improvement: x` (relative
improvement over the comparison model >= x; lower is better for perplexity, loss, toxicity and latency) and
`METRIC_gain_significant: true` (the gain over the comparison model is positive and significant, p < 0.05, by the
paired test of tuneloop.stats.paired_comparison on per-row scores)."""

from __future__ import annotations

from typing import Any

from tuneloop.errors import ConfigError
from tuneloop.stats import ALPHA

LOWER_IS_BETTER = (
    "perplexity",
    "mean_nll",
    "toxicity_rate",
    "redteam_toxic_rate",
    "redteam_unsafe_rate",
    "unsafe_output_rate",
    "over_refusal_rate",
    "judge_unparsed_rate",
    "eval_cost_usd",
    "ttft_s",
    "repetition_rate",
    "max_tokens_hit_rate",
)
SIGNIFICANT_SUFFIX = "_gain_significant"
# Metrics with per-row scores (tuneloop.scoring.per_row_scores), the only ones a significance gate can test.
PER_ROW_METRICS = ("exact_match", "accuracy", "rouge_1", "rouge_2", "rouge_l", "bleu")


def check_gates(
    gates: dict[str, float | bool],
    metrics: dict[str, float],
    baseline: dict[str, float] | None,
    significance: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Returns gate -> {"result": "pass"|"fail", "value", "threshold", "rule"}; significance gates add "p_value",
    "ci95" and "test". `significance` is tuneloop.stats.paired_comparison(evaluated rows, comparison rows)."""
    results: dict[str, Any] = {}
    for gate, threshold in gates.items():
        if gate.endswith(SIGNIFICANT_SUFFIX):
            if not isinstance(threshold, bool):
                raise ConfigError(f"eval.gates.{gate} must be true or false, not {threshold!r}")
            if threshold:
                results[gate] = _significance_gate(gate, gate[: -len(SIGNIFICANT_SUFFIX)], significance)
            continue
        if isinstance(threshold, bool):
            raise ConfigError(
                f"eval.gates.{gate}: true/false is only for METRIC{SIGNIFICANT_SUFFIX} gates",
                hint="give a number, e.g. accuracy: 0.85, or use accuracy_gain_significant: true",
            )
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


def _significance_gate(gate: str, name: str, significance: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    if name not in PER_ROW_METRICS:
        raise ConfigError(
            f"eval.gates.{gate}: {name!r} has no per-row scores to test",
            hint=f"significance gates work on {', '.join(PER_ROW_METRICS)}",
        )
    if significance is None or name not in significance:
        raise ConfigError(
            f"eval.gates.{gate} needs per-row {name!r} scores of the evaluated model and of a comparison model",
            hint=f"evaluate with --compare (default: base) and put {_group(name)!r} in eval.metrics",
        )
    test = significance[name]
    # Per-row metrics are all higher-is-better; the sign flip keeps the gate right for any that is not.
    gain = -test["difference"] if name in LOWER_IS_BETTER else test["difference"]
    passed = gain > 0 and bool(test["significant"])
    result = _result(passed, gain, ALPHA, f"gain > 0 with p < {ALPHA} ({test['test']})")
    return {**result, "p_value": test["p_value"], "ci95": test["ci95"], "test": test["test"]}


def _group(metric: str) -> str:
    """The eval.metrics group that computes a per-row metric."""
    return "rouge" if metric.startswith("rouge_") else metric


def _metric(metrics: dict[str, float], name: str, gate: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"eval.gates.{gate}: metric {name!r} was not computed",
            hint=f"computed metrics: {', '.join(sorted(metrics))}; add its group to eval.metrics",
        )
    return float(metrics[name])


def _result(passed: bool, value: float, threshold: float, rule: str) -> dict[str, Any]:
    return {"result": "pass" if passed else "fail", "value": value, "threshold": threshold, "rule": rule}
