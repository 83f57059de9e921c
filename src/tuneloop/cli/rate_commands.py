"""`tuneloop rate`: human evaluation results (`report`) and the Label Studio round trip (`export-labelstudio`,
`import-labelstudio`). People rate on the gateway's /dashboard/rate; these commands work on the evaluation folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from tuneloop.cli import rate_app
from tuneloop.cli.common import (
    ConfigOptionalOption,
    JsonOption,
    SetOption,
    emit_json,
    handles_errors,
    stdout,
)

if TYPE_CHECKING:
    from tuneloop.config import LoopConfig
    from tuneloop.evaluate.human import HumanSummary

EvalDirArgument = Annotated[
    Path,
    typer.Argument(
        help="An evaluation folder with outputs.jsonl (a run's eval/<name>/ or the workspace's evals/<name>/).",
        exists=True,
        file_okay=False,
    ),
]
ModeChoice = Literal["pairwise", "single"]


def _config(config_file: Path | None, overrides: list[str] | None) -> LoopConfig | None:
    if config_file is None and not overrides:
        return None
    from tuneloop.config_file import load_config

    return load_config(config_file, overrides)


@rate_app.command("report")
@handles_errors
def report(
    eval_dir: EvalDirArgument,
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Aggregate the folder's ratings.jsonl: mean per rubric dimension with 95% t-intervals, win rate with its Wilson
    interval, Krippendorff's alpha between raters; merged into metrics.json and report.md, logged to MLflow."""
    from tuneloop.evaluate.human import human_report

    outcome = human_report(eval_dir, _config(config_file, overrides))
    summary = outcome.summary
    if as_json:
        emit_json(
            {
                "metrics": summary.metrics,
                "raters": summary.raters,
                "rated_rows": summary.rated_rows,
                "ratings": summary.ratings,
                "metrics_file": outcome.metrics_file,
                "report_md": outcome.report_md,
                "mlflow_run_id": outcome.mlflow_run_id,
            }
        )
        return
    stdout.print(_table(summary))
    for comparison in summary.comparisons:
        low, high = comparison.interval
        stdout.print(
            f"{comparison.first} preferred over {comparison.other} in {comparison.win_rate:.1%} of "
            f"{comparison.count} judgements (Wilson 95% {low:.1%}-{high:.1%}; {comparison.wins} wins, "
            f"{comparison.ties} ties, {comparison.losses} losses)"
        )
    alphas = {"scores (ordinal)": summary.score_alpha, "preference (nominal)": summary.preference_alpha}
    stdout.print(
        "Krippendorff's alpha: "
        + ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in alphas.items())
    )
    written = ", ".join(str(path) for path in (outcome.metrics_file, outcome.report_md) if path is not None)
    logged = f"; logged to MLflow run {outcome.mlflow_run_id}" if outcome.mlflow_run_id else ""
    stdout.print(f"updated {written}{logged}")


def _table(summary: HumanSummary) -> Table:
    labels = [label for label in summary.labels if summary.metrics.get(label)]
    table = Table(
        title=f"Human evaluation: {summary.ratings} ratings by {len(summary.raters)} rater(s) on "
        f"{summary.rated_rows} rows (mean, 95% t-interval)"
    )
    table.add_column("dimension")
    for label in labels:
        table.add_column(label, justify="right")
    for dimension in [*summary.dimensions, "score"]:
        cells = []
        for label in labels:
            values = summary.metrics[label]
            mean = values.get(f"human_{dimension}_mean")
            low, high = values.get(f"human_{dimension}_ci_low"), values.get(f"human_{dimension}_ci_high")
            cell = "-" if mean is None else f"{mean:.2f}"
            cells.append(cell + (f" ({low:.2f}-{high:.2f})" if low is not None and high is not None else ""))
        table.add_row("overall" if dimension == "score" else dimension, *cells)
    return table


@rate_app.command("export-labelstudio")
@handles_errors
def export_labelstudio(
    eval_dir: EvalDirArgument,
    mode: Annotated[
        ModeChoice, typer.Option("--mode", help="pairwise: two answers and a preference; single: grade one answer.")
    ] = "pairwise",
    pair: Annotated[
        int, typer.Option("--pair", help="Pairwise: compare the first model with the N-th other one.", min=1)
    ] = 1,
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write labelstudio_tasks.json (blind, shuffled tasks to import into a Label Studio project) and
    labelstudio_config.xml (its labeling interface: the rubric's 1-5 ratings, the preference, a note); the key
    stays in the folder."""
    from tuneloop.config import DEFAULT_RUBRIC
    from tuneloop.evaluate.labelstudio import export_tasks

    config = _config(config_file, overrides)
    rubric = config.eval.rubric if config is not None else dict(DEFAULT_RUBRIC)
    seed = config.project.seed if config is not None else 0
    result = export_tasks(eval_dir, rubric, mode, pair, seed)
    if as_json:
        emit_json({"tasks": result.tasks, "config": result.config, "key": result.key, "count": result.count})
        return
    stdout.print(
        f"{result.count} {mode} tasks: {result.tasks}\nlabeling config: {result.config}\n"
        f"key (keep it here): {result.key}\nIn Label Studio: create a project, paste the labeling config, import the "
        "tasks; when done, export as JSON and run `tuneloop rate import-labelstudio EXPORT.json "
        f"{eval_dir}`"
    )


@rate_app.command("import-labelstudio")
@handles_errors
def import_labelstudio(
    export_file: Annotated[Path, typer.Argument(help="Label Studio's JSON export of the project.")],
    eval_dir: EvalDirArgument,
    as_json: JsonOption = False,
) -> None:
    """Read Label Studio's JSON export into the folder's ratings.jsonl (labels resolved with the export's key);
    then run `tuneloop rate report`."""
    from tuneloop.evaluate.labelstudio import import_export

    result = import_export(export_file, eval_dir)
    if as_json:
        emit_json(result.__dict__)
        return
    stdout.print(
        f"imported {result.imported} annotations by {len(result.raters)} annotator(s) into {result.ratings} "
        f"({result.replaced} from an earlier import replaced, {result.skipped_cancelled} skipped as cancelled)"
    )
