"""Significance gates (`METRIC_gain_significant: true`): from real per-row scores of two models' answers through the
paired tests to pass/fail, and the clear errors when the data they need is missing or the gate is mistyped."""

from __future__ import annotations

import pytest

from tuneloop.config_file import validate_config
from tuneloop.errors import ConfigError
from tuneloop.evaluate.gates import check_gates
from tuneloop.scoring import per_row_scores
from tuneloop.stats import paired_comparison

LABELS = ["positive", "negative"]
REFERENCES = ["positive", "negative"] * 30  # 60 rows
GROUPS = {"accuracy", "exact_match", "rouge"}


def answers(wrong_every: int) -> list[str]:
    """Answers to REFERENCES, wrong on every `wrong_every`-th row (0: never)."""
    flip = {"positive": "negative", "negative": "positive"}
    return [
        f"The sentiment is {flip[label] if wrong_every and i % wrong_every == 0 else label}."
        for i, label in enumerate(REFERENCES)
    ]


def metrics_and_significance(tuned: list[str], base: list[str]) -> tuple[dict, dict, dict]:
    tuned_rows = per_row_scores(tuned, REFERENCES, GROUPS, LABELS, None)
    base_rows = per_row_scores(base, REFERENCES, GROUPS, LABELS, None)
    means = [{name: sum(values) / len(values) for name, values in rows.items()} for rows in (tuned_rows, base_rows)]
    return means[0], means[1], paired_comparison(tuned_rows, base_rows)


def test_gate_passes_on_a_clearly_better_model() -> None:
    # tuned: right on 57 of 60 rows; base: wrong on every other row (right on 30).
    metrics, baseline, significance = metrics_and_significance(answers(20), answers(2))
    gates = {"accuracy_gain_significant": True, "rouge_l_gain_significant": True, "accuracy": 0.9}
    results = check_gates(gates, metrics, baseline, significance)
    accuracy = results["accuracy_gain_significant"]
    assert accuracy["result"] == "pass" and accuracy["test"] == "McNemar exact"
    assert accuracy["value"] == pytest.approx(0.95 - 0.5)
    # 27 rows only the tuned model gets right, 0 the other way: p = 2 / 2^27.
    assert accuracy["p_value"] == pytest.approx(2 / 2**27) and accuracy["ci95"][0] > 0
    assert results["rouge_l_gain_significant"]["result"] == "pass"
    assert results["rouge_l_gain_significant"]["test"] == "paired bootstrap"
    assert results["accuracy"]["result"] == "pass"


def test_gate_fails_on_an_equal_model_and_on_a_worse_one() -> None:
    metrics, baseline, significance = metrics_and_significance(answers(2), answers(2))
    equal = check_gates({"accuracy_gain_significant": True}, metrics, baseline, significance)
    assert equal["accuracy_gain_significant"]["result"] == "fail"
    assert equal["accuracy_gain_significant"]["value"] == 0 and equal["accuracy_gain_significant"]["p_value"] == 1
    # A small gain (3 rows of 60 better) is real-looking but not significant: p = 2 / 2^3 = 0.25.
    metrics, baseline, significance = metrics_and_significance(answers(20), answers(10))
    small = check_gates({"accuracy_gain_significant": True}, metrics, baseline, significance)
    assert small["accuracy_gain_significant"]["value"] == pytest.approx(3 / 60)
    assert small["accuracy_gain_significant"]["p_value"] == pytest.approx(0.25)
    assert small["accuracy_gain_significant"]["result"] == "fail"
    # Significantly worse is a fail too, not a pass on the size of the difference.
    metrics, baseline, significance = metrics_and_significance(answers(2), answers(20))
    worse = check_gates({"accuracy_gain_significant": True}, metrics, baseline, significance)
    assert worse["accuracy_gain_significant"]["value"] < 0 and worse["accuracy_gain_significant"]["result"] == "fail"


def test_gate_errors_name_what_is_missing() -> None:
    metrics, baseline, significance = metrics_and_significance(answers(20), answers(2))
    with pytest.raises(ConfigError, match="accuracy_gain_significant needs per-row 'accuracy' scores") as error:
        check_gates({"accuracy_gain_significant": True}, metrics, baseline, None)
    assert "--compare" in (error.value.hint or "")
    with pytest.raises(ConfigError, match="bleu_gain_significant") as error:
        check_gates({"bleu_gain_significant": True}, metrics, baseline, significance)
    assert "'bleu' in eval.metrics" in (error.value.hint or "")
    with pytest.raises(ConfigError, match="'perplexity' has no per-row scores"):
        check_gates({"perplexity_gain_significant": True}, metrics, baseline, significance)
    with pytest.raises(ConfigError, match="must be true or false"):
        check_gates({"accuracy_gain_significant": 0.05}, metrics, baseline, significance)
    with pytest.raises(ConfigError, match="true/false is only for METRIC_gain_significant"):
        check_gates({"accuracy": True}, metrics, baseline, significance)
    assert check_gates({"accuracy_gain_significant": False}, metrics, baseline, None) == {}  # switched off


def test_config_accepts_true_only_for_significance_gates() -> None:
    config = validate_config({"eval": {"gates": {"accuracy_gain_significant": True, "accuracy": 1}}})
    assert config.eval.gates == {"accuracy_gain_significant": True, "accuracy": 1.0}
    assert isinstance(config.eval.gates["accuracy"], float)
    with pytest.raises(ConfigError, match=r"accuracy_gain_significant takes true or false, not 0\.5"):
        validate_config({"eval": {"gates": {"accuracy_gain_significant": 0.5}}})
    with pytest.raises(ConfigError, match="perplexity_max: true/false is only for METRIC_gain_significant"):
        validate_config({"eval": {"gates": {"perplexity_max": True}}})
