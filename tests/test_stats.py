"""The significance tests of tuneloop.stats against hand calculations and published values, and the per-row scores
of tuneloop.scoring that feed them (their means are the corpus metrics)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from tuneloop import scoring
from tuneloop.errors import DataError
from tuneloop.stats import mcnemar, paired_bootstrap, paired_comparison, ratings_needed, two_proportions


def fisher_two_sided_by_hand(a: int, n_a: int, b: int, n_b: int) -> float:
    """Sum of the hypergeometric probabilities of every table (same margins) no more likely than the observed one."""
    total, successes = n_a + n_b, a + b

    def probability(x: int) -> float:
        return math.comb(n_a, x) * math.comb(n_b, successes - x) / math.comb(total, successes)

    observed = probability(a)
    support = range(max(0, successes - n_b), min(successes, n_a) + 1)
    return sum(p for p in map(probability, support) if p <= observed * (1 + 1e-7))


def test_two_proportions_matches_newcombe_and_fisher_by_hand() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a): 56/70 vs 48/80, method 10.
    result = two_proportions(56, 70, 48, 80)
    assert result["difference"] == pytest.approx(0.2)
    assert result["ci95"] == pytest.approx([0.0524, 0.3339], abs=5e-5)
    assert result["p_value"] == pytest.approx(fisher_two_sided_by_hand(56, 70, 48, 80), rel=1e-9)
    assert result["p_value"] == pytest.approx(0.01252, abs=1e-5)
    assert result["significant"] and result["test"] == "Fisher exact"


def test_two_proportions_small_equal_groups_are_not_significant() -> None:
    result = two_proportions(5, 10, 5, 10)
    assert result["difference"] == 0 and result["p_value"] == pytest.approx(1.0) and not result["significant"]
    low, high = result["ci95"]
    assert low < -0.3 and high > 0.3  # ten ratings each say very little
    empty = two_proportions(3, 4, 0, 0)
    assert empty["difference"] is None and empty["p_value"] is None and not empty["significant"]
    with pytest.raises(DataError, match="group b has 5 successes out of 4"):
        two_proportions(1, 2, 5, 4)


def test_mcnemar_exact_against_the_binomial_by_hand() -> None:
    # 9 rows only a got right, 2 only b, 5 both: p = 2 * P(X <= 2 | n=11, 1/2) = 2 * (1 + 11 + 55) / 2^11.
    a = [True] * 9 + [False] * 2 + [True] * 5
    b = [False] * 9 + [True] * 2 + [True] * 5
    result = mcnemar(a, b)
    assert (result["b10"], result["b01"], result["both_correct"], result["both_wrong"]) == (9, 2, 5, 0)
    assert result["p_value"] == pytest.approx(134 / 2048, rel=1e-12)
    assert result["difference"] == pytest.approx(7 / 16)
    assert not result["significant"]
    low, high = result["ci95"]
    assert low < 0 < high  # the interval inverts the same exact test: it holds 0 exactly when p >= 0.05
    clear = mcnemar([True] * 20 + [False] * 2 + [True] * 5, [False] * 20 + [True] * 2 + [True] * 5)
    # 2 * P(X <= 2 | n=22, 1/2) = 2 * (1 + 22 + 231) / 2^22
    assert clear["p_value"] == pytest.approx(2 * 254 / 2**22, rel=1e-12)
    assert clear["significant"] and clear["ci95"][0] > 0
    same = mcnemar([True, False, True], [True, False, True])
    assert (same["p_value"], same["difference"], same["ci95"]) == (1.0, 0.0, [0.0, 0.0])


def test_paired_bootstrap_interval_and_p_value() -> None:
    generator = random.Random(7)
    base = [generator.random() for _ in range(400)]
    better = [score + 0.05 + generator.gauss(0, 0.2) for score in base]
    result = paired_bootstrap(better, base, resamples=10_000, seed=0)
    differences = [x - y for x, y in zip(better, base, strict=True)]
    mean, error = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(len(differences))
    assert result["difference"] == pytest.approx(mean)
    # For a mean of 400 differences the percentile interval is close to the normal one, mean +- 1.96 SE.
    assert result["ci95"] == pytest.approx([mean - 1.96 * error, mean + 1.96 * error], abs=0.15 * error)
    # The observed mean is ~5 SE from 0: no resample crosses 0, so p is the smallest the bootstrap can give.
    assert result["p_value"] == pytest.approx(2 / 10_001) and result["significant"]
    assert paired_bootstrap(better, base, seed=0) == result  # the seed makes it repeatable
    same = paired_bootstrap(base, base)
    assert (same["difference"], same["ci95"], same["p_value"], same["significant"]) == (0.0, [0.0, 0.0], 1.0, False)


@pytest.mark.parametrize(("seed", "significant"), [(11, True), (2, False)])
def test_paired_bootstrap_p_value_agrees_with_the_paired_t_test(seed: int, significant: bool) -> None:
    from scipy.stats import ttest_rel

    generator = random.Random(seed)
    base = [generator.random() for _ in range(300)]
    other = [score + 0.03 + generator.gauss(0, 0.25) for score in base]
    result = paired_bootstrap(other, base, resamples=20_000)
    t_test = ttest_rel(other, base).pvalue
    assert 0.01 < t_test < 0.2  # borderline cases (p ~0.03 and ~0.11), where the two must agree closely
    assert result["p_value"] == pytest.approx(t_test, rel=0.1)
    assert result["significant"] == significant == (t_test < 0.05)
    low, high = result["ci95"]
    assert (low > 0) == significant and low < result["difference"] < high


def test_ratings_needed_is_the_two_proportion_sample_size() -> None:
    # 50% vs 60%, alpha 0.05 two-sided, power 0.8: (1.96 * sqrt(2*.55*.45) + 0.8416 * sqrt(.25 + .24))^2 / 0.01.
    by_hand = (1.959964 * math.sqrt(2 * 0.55 * 0.45) + 0.841621 * math.sqrt(0.25 + 0.24)) ** 2 / 0.01
    assert ratings_needed(0.5) == math.ceil(by_hand) == 388
    assert ratings_needed(None) == 388
    assert ratings_needed(0.95) < ratings_needed(0.5)  # near the edge a rate varies less


def test_paired_comparison_picks_the_test_per_metric() -> None:
    a = {"accuracy": [1.0] * 12 + [0.0] * 8, "rouge_l": [0.9] * 20, "bleu": [30.0] * 20}
    b = {"accuracy": [0.0] * 12 + [0.0] * 8, "rouge_l": [0.5] * 20, "exact_match": [1.0] * 20}
    results = paired_comparison(a, b)
    assert set(results) == {"accuracy", "rouge_l"}  # only metrics both models have
    assert results["accuracy"]["test"] == "McNemar exact"
    assert results["accuracy"]["p_value"] == pytest.approx(2 / 2**12)  # 12 discordant rows, all for a
    assert results["rouge_l"]["test"] == "paired bootstrap" and results["rouge_l"]["difference"] == pytest.approx(0.4)
    for result in results.values():
        assert set(result) >= {"difference", "ci95", "p_value", "test", "significant", "n"}
        assert result["significant"] and result["n"] == 20
    with pytest.raises(DataError, match="'accuracy': 20 rows against 3"):
        paired_comparison(a, {"accuracy": [1.0, 0.0, 1.0]})


def test_per_row_scores_average_to_the_corpus_metrics() -> None:
    outputs = ["The answer is Paris.", "positive", "I think it is negative", "London", "the cat sat on the mat"]
    references = ["Paris", "positive", "positive", "Berlin", "the cat sat on a mat"]
    groups = {"exact_match", "accuracy", "rouge", "bleu"}
    rows = scoring.per_row_scores(outputs, references, groups, ["positive", "negative"], None)
    assert set(rows) == {"exact_match", "accuracy", "rouge_1", "rouge_2", "rouge_l", "bleu"}
    assert rows["exact_match"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert rows["accuracy"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert statistics.fmean(rows["exact_match"]) == scoring.exact_match(outputs, references)
    labels = ["positive", "negative"]
    assert statistics.fmean(rows["accuracy"]) == scoring.classification(outputs, references, labels, None)["accuracy"]
    corpus_rouge = scoring.rouge(outputs, references)
    for name in ("rouge_1", "rouge_2", "rouge_l"):
        assert statistics.fmean(rows[name]) == pytest.approx(corpus_rouge[name])
    assert rows["rouge_1"][3] == 0.0 and rows["rouge_1"][1] == 1.0
    assert rows["bleu"][1] == pytest.approx(100.0) and rows["bleu"][3] == 0.0
    assert 0 < rows["bleu"][4] < 100
    only_em = scoring.per_row_scores(outputs, references, {"exact_match"}, None, r"answer is (\w+)")
    assert only_em == {"exact_match": [1.0, 1.0, 0.0, 0.0, 0.0]}
