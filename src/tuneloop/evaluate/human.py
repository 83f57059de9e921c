"""Human evaluation results: aggregate an evaluation folder's `ratings.jsonl` (from /dashboard/rate or Label Studio)
into metrics, merge them into its `metrics.json` and `report.md`, and log them to the evaluated run's MLflow run.

Statistics (what `tuneloop rate report` prints):
- Scores: each row's scores of a model are first averaged over its raters, then the mean over rows gets a Student-t
  95% interval (rows are the independent units; several raters of one row are not independent samples), clipped to
  the 1-5 scale.
- Win rate of the first model (the evaluated one) against the second: wins plus half the ties over all pairwise
  judgements, with a Wilson 95% interval (`tuneloop.stats.wilson_interval`).
- Agreement between raters: Krippendorff's alpha over the units two or more raters rated: ordinal for the 1-5
  scores (a unit is row x model x dimension), nominal for the preference (a unit is row x compared pair). Computed
  here from the coincidence matrix (Krippendorff 2011); the `krippendorff` package (GPL-3) checks it in the tests.
When a rater rated the same item twice, the later rating counts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.ratings import (
    HIGHEST_SCORE,
    LOWEST_SCORE,
    TIE,
    HumanRating,
    model_labels,
    read_outputs,
    read_ratings,
)
from tuneloop.artifacts.training import RunRecord
from tuneloop.config import LoopConfig, ProjectConfig
from tuneloop.errors import DataError
from tuneloop.stats import wilson_interval
from tuneloop.workspace import EvalPaths, RunPaths, Workspace

AlphaLevel = Literal["nominal", "ordinal", "interval"]
SECTION_TITLE = "## Human evaluation"
NOTES_IN_REPORT = 20


@dataclass
class Comparison:
    """The first model against another in pairwise judgements."""

    first: str
    other: str
    wins: int
    ties: int
    losses: int

    @property
    def count(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.count if self.count else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.win_rate, self.count)


@dataclass
class HumanSummary:
    labels: list[str]
    dimensions: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> human_* metric -> value
    comparisons: list[Comparison] = field(default_factory=list)
    score_alpha: float | None = None
    preference_alpha: float | None = None
    raters: list[str] = field(default_factory=list)
    rated_rows: int = 0
    ratings: int = 0
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # (rater, row id, note)


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t interval of the mean; no interval from fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    from scipy.stats import t

    margin = t.ppf((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - margin, mean + margin


def krippendorff_alpha(units: Mapping[Hashable, Mapping[str, Any]], level: AlphaLevel) -> float | None:
    """Krippendorff's alpha of `units` (unit -> rater -> value); None when no unit has two raters or every value is
    the same (alpha is 0/0 then)."""
    import numpy as np

    pairable = [list(by_rater.values()) for by_rater in units.values() if len(by_rater) >= 2]
    if not pairable:
        return None
    domain = sorted({value for values in pairable for value in values}, key=lambda v: (str(type(v)), v))
    index = {value: position for position, value in enumerate(domain)}
    coincidences = np.zeros((len(domain), len(domain)))
    for values in pairable:
        counts = np.zeros(len(domain))
        for value in values:
            counts[index[value]] += 1
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(values) - 1)
    totals = coincidences.sum(axis=1)
    distance = _squared_distances(domain, totals, level)
    expected = float((np.outer(totals, totals) * distance).sum())
    if expected == 0:
        return None
    return 1 - (totals.sum() - 1) * float((coincidences * distance).sum()) / expected


def _squared_distances(domain: list[Any], totals: Any, level: AlphaLevel) -> Any:
    import numpy as np

    size = len(domain)
    if level == "nominal":
        return 1.0 - np.eye(size)
    values = np.array(domain, dtype=float)
    if level == "interval":
        return np.subtract.outer(values, values) ** 2
    # Ordinal: the distance between ranks c <= k is the number of values between them, halving the end points.
    cumulative = np.concatenate([[0.0], np.cumsum(totals)])
    distance = np.zeros((size, size))
    for low in range(size):
        for high in range(low, size):
            between = cumulative[high + 1] - cumulative[low] - (totals[low] + totals[high]) / 2
            distance[low, high] = distance[high, low] = between**2
    return distance


def latest_ratings(ratings: Iterable[HumanRating]) -> list[HumanRating]:
    """One rating per rater and item (row, mode, models judged): the latest."""
    latest: dict[tuple[str, str, str, frozenset[str]], HumanRating] = {}
    for rating in sorted(ratings, key=lambda rating: rating.time):
        latest[(rating.rater, rating.row_id, rating.mode, rating.labels)] = rating
    return list(latest.values())


def aggregate(ratings: list[HumanRating], labels: list[str], dimensions: list[str]) -> HumanSummary:
    """The human metrics of every model in `labels` (the evaluated model first) over `ratings`."""
    ratings = latest_ratings(ratings)
    found = [dimension for rating in ratings for by_dim in rating.scores.values() for dimension in by_dim]
    dimensions = list(dict.fromkeys([*dimensions, *found]))
    labels = list(dict.fromkeys([*labels, *(label for rating in ratings for label in rating.answers.values())]))
    summary = HumanSummary(labels, dimensions, ratings=len(ratings))
    summary.raters = sorted({rating.rater for rating in ratings})
    summary.rated_rows = len({rating.row_id for rating in ratings})
    summary.notes = [(rating.rater, rating.row_id, rating.note) for rating in ratings if rating.note]
    for label in labels:
        summary.metrics[label] = _score_metrics(ratings, label, dimensions)
    _add_comparisons(summary, ratings)
    summary.score_alpha = krippendorff_alpha(_score_units(ratings), "ordinal")
    summary.preference_alpha = krippendorff_alpha(_preference_units(ratings), "nominal")
    for values in summary.metrics.values():
        values["human_raters"] = float(len(summary.raters))
        values["human_rated_rows"] = float(summary.rated_rows)
        if summary.score_alpha is not None:
            values["human_agreement_alpha"] = summary.score_alpha
        if summary.preference_alpha is not None:
            values["human_preference_alpha"] = summary.preference_alpha
    return summary


def _score_metrics(ratings: list[HumanRating], label: str, dimensions: list[str]) -> dict[str, float]:
    by_row: dict[str, dict[str, list[int]]] = {}  # row -> dimension -> scores given by raters
    for rating in ratings:
        for dimension, score in rating.scores.get(label, {}).items():
            by_row.setdefault(rating.row_id, {}).setdefault(dimension, []).append(score)
    metrics: dict[str, float] = {}
    for dimension in dimensions:
        row_means = [statistics.fmean(scores[dimension]) for scores in by_row.values() if dimension in scores]
        if row_means:
            metrics.update(_interval_metrics(f"human_{dimension}", row_means))
    overall = [statistics.fmean([s for scores in by_dim.values() for s in scores]) for by_dim in by_row.values()]
    if overall:
        metrics.update(_interval_metrics("human_score", overall))
    return metrics


def _interval_metrics(prefix: str, values: list[float]) -> dict[str, float]:
    """Mean and t-interval, the interval clipped to the 1-5 scale (a t-interval of few rows can pass its ends)."""
    mean, low, high = t_interval(values)
    metrics = {f"{prefix}_mean": mean}
    if low is not None and high is not None:
        metrics |= {f"{prefix}_ci_low": max(low, LOWEST_SCORE), f"{prefix}_ci_high": min(high, HIGHEST_SCORE)}
    return metrics


def _add_comparisons(summary: HumanSummary, ratings: list[HumanRating]) -> None:
    """The first model against each other one; `human_win_rate` of the first is against the second label, each other
    label's is its own rate against the first."""
    first = summary.labels[0]
    for other in summary.labels[1:]:
        judged = [r for r in ratings if r.mode == "pairwise" and r.labels == {first, other} and r.preference]
        if not judged:
            continue
        comparison = Comparison(
            first,
            other,
            wins=sum(r.preference == first for r in judged),
            ties=sum(r.preference == TIE for r in judged),
            losses=sum(r.preference == other for r in judged),
        )
        summary.comparisons.append(comparison)
        low, high = comparison.interval
        mirrored = wilson_interval(1 - comparison.win_rate, comparison.count)
        summary.metrics[other] |= _win_metrics(1 - comparison.win_rate, mirrored, comparison.count)
        if len(summary.comparisons) == 1:
            summary.metrics[first] |= _win_metrics(comparison.win_rate, (low, high), comparison.count)


def _win_metrics(rate: float, interval: tuple[float, float], count: int) -> dict[str, float]:
    return {
        "human_win_rate": rate,
        "human_win_rate_ci_low": interval[0],
        "human_win_rate_ci_high": interval[1],
        "human_comparisons": float(count),
    }


def _score_units(ratings: list[HumanRating]) -> dict[Hashable, dict[str, int]]:
    units: dict[Hashable, dict[str, int]] = {}
    for rating in sorted(ratings, key=lambda rating: rating.time):  # a later score of the same unit wins
        for label, by_dimension in rating.scores.items():
            for dimension, score in by_dimension.items():
                units.setdefault((rating.row_id, label, dimension), {})[rating.rater] = score
    return units


def _preference_units(ratings: list[HumanRating]) -> dict[Hashable, dict[str, str]]:
    units: dict[Hashable, dict[str, str]] = {}
    for rating in sorted(ratings, key=lambda rating: rating.time):
        if rating.mode == "pairwise" and rating.preference:
            units.setdefault((rating.row_id, rating.labels), {})[rating.rater] = rating.preference
    return units


@dataclass
class HumanReport:
    """What `tuneloop rate report` did."""

    summary: HumanSummary
    metrics_file: Path | None
    report_md: Path
    mlflow_run_id: str | None


def human_report(eval_dir: Path, config: LoopConfig | None = None) -> HumanReport:
    """Aggregate `eval_dir`'s ratings; merge the metrics into its metrics.json (each label's), replace the "Human
    evaluation" section of its report.md, and log the metrics to the evaluated run's MLflow run when there is one."""
    paths = EvalPaths(eval_dir)
    ratings = read_ratings(paths.ratings)
    if not ratings:
        raise DataError(
            f"no ratings in {paths.ratings}",
            hint="rate on the gateway's /dashboard/rate, or `tuneloop rate import-labelstudio EXPORT.json DIR`",
        )
    labels = model_labels(read_outputs(paths.outputs)) if paths.outputs.exists() else []
    dimensions = list(config.eval.rubric) if config is not None else []
    summary = aggregate(ratings, labels, dimensions)
    metrics_file = _merge_metrics(paths, summary)
    _write_section(paths.report_md, summary)
    return HumanReport(summary, metrics_file, paths.report_md, log_human_metrics(paths, summary, config))


def _merge_metrics(paths: EvalPaths, summary: HumanSummary) -> Path | None:
    if not paths.metrics.exists():
        return None
    report = EvalReport.load(paths.metrics)
    for label, values in summary.metrics.items():
        kept = {name: value for name, value in report.metrics.get(label, {}).items() if not name.startswith("human_")}
        report.metrics[label] = kept | values
    report.save(paths.metrics)
    return paths.metrics


def _write_section(report_md: Path, summary: HumanSummary) -> None:
    section = human_section(summary)
    text = report_md.read_text(encoding="utf-8") if report_md.exists() else ""
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    report_md.write_text(text, encoding="utf-8")


def human_section(summary: HumanSummary) -> str:
    """The report.md section: scores with intervals, win rate, agreement, notes."""
    labels = [label for label in summary.labels if summary.metrics.get(label)]
    lines = [
        SECTION_TITLE,
        "",
        f"{summary.ratings} ratings by {len(summary.raters)} rater(s) ({', '.join(summary.raters)}) on "
        f"{summary.rated_rows} rows, blind and shuffled. Scores 1-5: mean over rows (each row averaged over its "
        "raters) with a Student-t 95% interval, clipped to 1-5.",
        "",
        "| dimension | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for dimension in [*summary.dimensions, "score"]:
        cells = [_mean_cell(summary.metrics[label], f"human_{dimension}") for label in labels]
        name = "**overall**" if dimension == "score" else dimension
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for comparison in summary.comparisons:
        low, high = comparison.interval
        lines.append(
            f"- **{comparison.first}** preferred over **{comparison.other}** in {comparison.win_rate:.1%} of "
            f"{comparison.count} judgements (ties count half; Wilson 95% {low:.1%}-{high:.1%}; {comparison.wins} "
            f"wins, {comparison.ties} ties, {comparison.losses} losses)."
        )
    lines.append(
        "- Agreement between raters (Krippendorff's alpha): "
        f"scores {_alpha_text(summary.score_alpha)} (ordinal), preference {_alpha_text(summary.preference_alpha)} "
        "(nominal)."
    )
    if summary.notes:
        lines += ["", "Notes:", ""]
        for rater, row_id, note in summary.notes[:NOTES_IN_REPORT]:
            lines.append(f"- {row_id} ({rater}): " + " ".join(note.split()))
    return "\n".join(lines) + "\n"


def _mean_cell(metrics: dict[str, float], prefix: str) -> str:
    if f"{prefix}_mean" not in metrics:
        return "–"
    cell = f"{metrics[f'{prefix}_mean']:.2f}"
    if f"{prefix}_ci_low" in metrics:
        cell += f" ({metrics[f'{prefix}_ci_low']:.2f}-{metrics[f'{prefix}_ci_high']:.2f})"
    return cell


def _alpha_text(alpha: float | None) -> str:
    return f"{alpha:.3f}" if alpha is not None else "n/a (needs two raters on the same items, and some variation)"


def log_human_metrics(paths: EvalPaths, summary: HumanSummary, config: LoopConfig | None) -> str | None:
    """The metrics (as `eval.<label>.human_*`, like `tuneloop eval`'s) and ratings.jsonl into the MLflow run of the
    training run this folder evaluates (`runs/<id>/eval/<name>/`); the MLflow run id, or None when there is none."""
    run = RunPaths(paths.root.parent.parent)
    if paths.root.parent.name != run.evals.name or not run.record.exists():
        return None
    mlflow_run_id = RunRecord.load(run.record).mlflow_run_id
    if not mlflow_run_id:
        return None
    project, tracking_uri = _tracking_settings(run, config)
    from tuneloop.tracking import Tracker

    tracker = Tracker.open(Workspace(run.root.parent.parent), tracking_uri, project)
    tracker.log_metrics(
        mlflow_run_id,
        {f"eval.{label}.{name}": value for label, values in summary.metrics.items() for name, value in values.items()},
    )
    tracker.client.log_artifact(mlflow_run_id, str(paths.ratings), artifact_path=f"eval/{paths.root.name}")
    return mlflow_run_id


def _tracking_settings(run: RunPaths, config: LoopConfig | None) -> tuple[str, str | None]:
    """The MLflow experiment (the project's name) and tracking URI: from the config, else the run's own config."""
    if config is not None:
        return config.project.name, config.registry.tracking_uri
    saved = json.loads(run.config.read_text(encoding="utf-8")) if run.config.exists() else {}
    project = (saved.get("project") or {}).get("name") or ProjectConfig().name
    return project, (saved.get("registry") or {}).get("tracking_uri")
