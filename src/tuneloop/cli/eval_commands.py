"""`tuneloop eval`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import (
    ConfigOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    fmt,
    handles_errors,
    quiet_libraries,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from tuneloop.artifacts.evaluation import EvalReport


@app.command("eval")
@handles_errors
def evaluate(
    config_file: ConfigOption,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The model to evaluate: a run id, `base`, NAME@alias, a model/adapter folder, `openai:MODEL` or "
            "`url:http://HOST:PORT/v1#MODEL`. Default: the newest finished run.",
        ),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Compare with this model (repeatable; same references as --model). The first is the baseline of "
            "gates and deltas. Default: `base`; `none` to skip.",
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            help="LLM judge (`openai:MODEL` or `url:...#MODEL`): pairwise with swapped positions and 1-5 grades on "
            "eval.rubric; judge_* metrics, judge.jsonl.",
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluate on this file instead of the validation split.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many rows.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a gate fails.")] = False,
    harness: Annotated[str | None, typer.Option("--harness", help="lm-eval tasks, comma-separated.")] = None,
    harness_include: Annotated[
        Path | None, typer.Option("--harness-include", help="Folder of local lm-eval task YAML.")
    ] = None,
    pairwise: Annotated[
        bool, typer.Option("--pairwise", help="Write a blind A/B sheet of the two models' answers.")
    ] = False,
    import_ratings: Annotated[
        Path | None, typer.Option("--import-ratings", help="Ratings for a pairwise sheet: CSV/JSONL.")
    ] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a model against its base and other models, local or API (`openai:MODEL`, `url:BASE#MODEL`; keys from
    $OPENAI_API_KEY / $TUNELOOP_EVAL_API_KEY): perplexity, BLEU/ROUGE, exact match, accuracy, safety, generation
    stats, latency, API cost; an LLM judge with --judge; gates; report.md/report.html and outputs.jsonl; results
    logged to the run's MLflow run."""
    quiet_libraries()
    if import_ratings is not None:
        from tuneloop.evaluate.pairwise import import_ratings as read_ratings

        outcome = read_ratings(import_ratings)
        if as_json:
            emit_json(outcome)
        else:
            low, high = outcome["ci95"]
            stdout.print(
                f"{outcome['model']} preferred in {outcome['preference_rate']:.1%} of {outcome['rated']} "
                f"rated pairs (95% CI {low:.1%}-{high:.1%}; {outcome['wins']} wins, {outcome['ties']} ties, "
                f"{outcome['losses']} losses)"
            )
        return
    from tuneloop.config_file import load_config
    from tuneloop.evaluate.run import run_evaluation
    from tuneloop.serve.offline import local_eval_engine
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    place = Workspace.from_env(workspace)
    report = run_evaluation(
        config,
        place,
        model,
        [ref for ref in (compare or ["base"]) if ref != "none"],
        data_file=data,
        limit=limit,
        pairwise=pairwise,
        harness_tasks=[task.strip() for task in harness.split(",")] if harness else None,
        harness_include=harness_include,
        console=stderr,
        judge_ref=judge,
        local_engine=local_eval_engine(config, place, stderr),
    )
    if as_json:
        emit_json(report.model_dump(mode="json", exclude={"details"}))
    else:
        _print_eval_summary(report)
    if strict and not report.passed:
        raise typer.Exit(1)


def _print_eval_summary(report: EvalReport) -> None:
    labels = list(report.models)
    table = Table(title=f"evaluation on {report.rows} rows")
    table.add_column("metric")
    for label in labels:
        table.add_column(f"{label}", justify="right")
    if len(labels) > 1:
        table.add_column("delta", justify="right")
    names = sorted({name for values in report.metrics.values() for name in values})
    for name in names:
        values = [report.metrics[label].get(name) for label in labels]
        cells = [fmt(value) for value in values]
        if len(labels) > 1:
            cells.append("-" if None in values[:2] else f"{values[0] - values[1]:+.4f}")
        table.add_row(name, *cells)
    stdout.print(table)
    if report.significance:
        tests = Table(title=f"is the difference real? {labels[0]} - {labels[1]}, paired on the same rows")
        for column in ("metric", "difference", "95% CI", "p-value", "test", "significant"):
            tests.add_column(column, justify="left" if column in ("metric", "test") else "right")
        for metric, test in report.significance.items():
            low, high = test["ci95"]
            tests.add_row(
                metric,
                f"{test['difference']:+.4f}",
                f"[{low:+.4f}, {high:+.4f}]",
                f"{test['p_value']:.3g}",
                test["test"],
                "[green]yes[/]" if test["significant"] else "no",
            )
        stdout.print(tests)
    for gate, result in report.gate_details.items():
        colour = "green" if result["result"] == "pass" else "red"
        stdout.print(f"gate {gate} ({result['rule']}): {result['value']:.4f} [{colour}]{result['result']}[/]")
    if report.judge:
        judge = report.judge
        stdout.print(
            f"judge {judge['judge']}: {judge['calls']} calls, {judge['unparsed']} without a verdict; reasons in "
            f"{judge['file']}"
        )
    stdout.print(f"report: {report.report}")
