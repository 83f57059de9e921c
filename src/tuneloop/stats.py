"""Statistics shared by evaluation, the gateway's A/B report and the dashboard: intervals and significance tests
that say whether a difference is real.

Every test returns the same shape: `difference` (first minus second), `ci95` ([low, high]), `p_value` (two-sided),
`significant` (p < 0.05), `test` (its name) and `n`, plus the counts it was computed from.
"""

from __future__ import annotations

import math
from typing import Any

from tuneloop.errors import DataError

ALPHA = 0.05  # "significant" means p < ALPHA; the intervals are the matching 95% ones
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# Per-row metrics that are 0/1 per row: compared with McNemar's test instead of the bootstrap.
BINARY_METRICS = ("exact_match", "accuracy")
BOOTSTRAP_CELLS = 2_000_000  # resampled values held in memory at once (chunks of resamples x rows)


def wilson_interval(rate: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` observed over `count` trials (95% for z=1.96)."""
    if count <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / count
    centre = (rate + z * z / (2 * count)) / denominator
    margin = z * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean difference a - b of per-row scores of two models on the same rows, with its 95% percentile bootstrap
    interval (rows resampled with replacement, the pair kept together) and a two-sided p-value: twice the share of
    resampled mean differences on the other side of 0 from the observed one, with the usual +1 correction so a
    finite number of resamples never claims p = 0 (the smallest possible p is 2 / (resamples + 1))."""
    import numpy as np

    differences = np.asarray(_paired(a, b, "paired_bootstrap"), dtype=float)
    n = len(differences)
    observed = float(differences.mean())
    generator = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS // n)
    means = np.concatenate(
        [
            differences[generator.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    if observed > 0:
        beyond = int((means <= 0).sum())
    elif observed < 0:
        beyond = int((means >= 0).sum())
    else:
        beyond = resamples  # no observed difference: p = 1
    p_value = min(1.0, 2 * (beyond + 1) / (resamples + 1))
    return {
        **_result(observed, (float(low), float(high)), p_value, "paired bootstrap", n),
        "resamples": resamples,
    }


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict[str, Any]:
    """Exact (binomial) McNemar test of paired accuracy: only the rows where the two models disagree count.

    `b10`: rows a got right and b wrong; `b01`: rows a got wrong and b right. Under "no difference" each disagreement
    is a fair coin, so p = the two-sided binomial test of b10 out of b10 + b01 at 0.5 (statsmodels'
    `mcnemar(exact=True)`). The difference is the accuracy of a minus that of b, (b10 - b01) / n. Its interval is the
    exact (Clopper-Pearson) interval of b10's share of the disagreements, scaled to the difference: the inversion of
    the same binomial test, so the interval leaves out 0 exactly when p < 0.05."""
    from scipy.stats import binomtest

    n = len(_paired(a_correct, b_correct, "mcnemar"))
    pairs = list(zip(a_correct, b_correct, strict=True))
    both = sum(1 for x, y in pairs if x and y)
    b10 = sum(1 for x, y in pairs if x and not y)
    b01 = sum(1 for x, y in pairs if y and not x)
    discordant = b10 + b01
    if discordant:
        binomial = binomtest(b10, discordant, 0.5)
        p_value = float(binomial.pvalue)
        share = binomial.proportion_ci(confidence_level=1 - ALPHA, method="exact")
        scale = discordant / n  # difference = scale * (2 * share - 1)
        ci = (scale * (2 * share.low - 1), scale * (2 * share.high - 1))
    else:
        p_value, ci = 1.0, (0.0, 0.0)  # the models agree on every row
    return {
        **_result((b10 - b01) / n, ci, min(1.0, p_value), "McNemar exact", n),
        "b10": b10,
        "b01": b01,
        "both_correct": both,
        "both_wrong": n - both - discordant,
    }


def two_proportions(successes_a: int, n_a: int, successes_b: int, n_b: int) -> dict[str, Any]:
    """Rate a minus rate b for two independent groups (online A/B: positive ratings out of ratings per variant).

    p-value: Fisher's exact test (two-sided). A/B tests are read early, with a few dozen ratings per variant, where
    a z-test's normal approximation is off; Fisher's is exact at any size (and slightly conservative).
    Interval: Newcombe's hybrid score interval (his method 10), built from the two Wilson intervals the dashboard
    already shows, so it behaves well near 0%, 100% and at small counts. Both are 95% / alpha 0.05; near the edge
    they can disagree (Fisher is the more cautious), and `significant` follows the p-value."""
    from scipy.stats import fisher_exact

    for name, successes, count in (("a", successes_a, n_a), ("b", successes_b, n_b)):
        if count < 0 or not 0 <= successes <= max(count, 0):
            raise DataError(f"two_proportions: group {name} has {successes} successes out of {count}")
    base = {"test": "Fisher exact", "n": n_a + n_b, "n_a": n_a, "n_b": n_b}
    if n_a == 0 or n_b == 0:
        return {**base, "difference": None, "ci95": None, "p_value": None, "significant": False}
    rate_a, rate_b = successes_a / n_a, successes_b / n_b
    low_a, high_a = wilson_interval(rate_a, n_a, Z95)
    low_b, high_b = wilson_interval(rate_b, n_b, Z95)
    difference = rate_a - rate_b
    ci = (
        difference - math.sqrt((rate_a - low_a) ** 2 + (high_b - rate_b) ** 2),
        difference + math.sqrt((high_a - rate_a) ** 2 + (rate_b - low_b) ** 2),
    )
    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    p_value = float(fisher_exact(table, alternative="two-sided").pvalue)
    return {
        **_result(difference, ci, min(1.0, p_value), "Fisher exact", n_a + n_b),
        **base,
        "rate_a": rate_a,
        "rate_b": rate_b,
    }


def ratings_needed(rate: float | None, difference: float = 0.10, power: float = 0.8) -> int:
    """Ratings per variant to detect `difference` (in rate, 0.10 = 10 points) from a control at `rate` with
    `power` at alpha 0.05, two-sided (the usual normal-approximation sample size for two proportions; Fisher's exact
    test needs a few more). An unknown rate is taken as 0.5, the worst case."""
    from scipy.stats import norm

    p1 = 0.5 if rate is None else rate
    p2 = p1 + difference if p1 + difference <= 1 else p1 - difference
    pooled = (p1 + p2) / 2
    z_power = float(norm.ppf(power))
    numerator = Z95 * math.sqrt(2 * pooled * (1 - pooled)) + z_power * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(numerator**2 / difference**2)


def paired_comparison(
    scores_a: dict[str, list[float]], scores_b: dict[str, list[float]], seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per metric present in both (per-row scores of two models on the same rows, e.g. from
    tuneloop.scoring.per_row_scores): McNemar for 0/1 metrics (exact_match, accuracy), the paired bootstrap for the
    rest. `difference` is a minus b."""
    results: dict[str, dict[str, Any]] = {}
    for metric, values_a in scores_a.items():
        if metric not in scores_b:
            continue
        values_b = scores_b[metric]
        if len(values_a) != len(values_b):
            raise DataError(
                f"paired comparison of {metric!r}: {len(values_a)} rows against {len(values_b)}",
                hint="both models must be scored on the same rows, in the same order",
            )
        binary = metric in BINARY_METRICS and all(value in (0, 1) for value in [*values_a, *values_b])
        if binary:
            results[metric] = mcnemar([bool(v) for v in values_a], [bool(v) for v in values_b])
        else:
            results[metric] = paired_bootstrap(values_a, values_b, seed=seed)
    return results


def _paired(a: list[Any], b: list[Any], test: str) -> list[float]:
    if len(a) != len(b):
        raise DataError(
            f"{test}: the two models were scored on {len(a)} and {len(b)} rows",
            hint="a paired test needs both models' scores on the same rows, in the same order",
        )
    if not a:
        raise DataError(f"{test}: no rows to compare", hint="evaluate at least one row")
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def _result(difference: float, ci: tuple[float, float], p_value: float, test: str, n: int) -> dict[str, Any]:
    return {
        "difference": difference,
        "ci95": [ci[0], ci[1]],
        "p_value": p_value,
        "significant": p_value < ALPHA,
        "test": test,
        "n": n,
    }
