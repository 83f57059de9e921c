"""`tuneloop data prepare|demo|from-feedback|synth|export-labelstudio|import-labelstudio`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from tuneloop.cli import data_app
from tuneloop.cli.common import (
    ConfigOption,
    ConfigOptionalOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    handles_errors,
    quiet_libraries,
    stderr,
    stdout,
)
from tuneloop.config import SynthMode
from tuneloop.data.feedback_pairs import DEFAULT_MAX_PAIRS_PER_PROMPT  # light: no torch, no datasets


@data_app.command("prepare")
@handles_errors
def data_prepare(
    config_file: ConfigOption,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a cached artifact matches.")] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read, check, filter, render, tokenize, split (and pack) the configured sources into a dataset artifact."""
    quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.data.prepare import prepare_dataset
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    prepared = prepare_dataset(config, Workspace.from_env(workspace), force=force, console=stderr)
    summary = prepared.summary()
    if as_json:
        emit_json(summary)
        return
    _print_prepare_summary(summary)


def _print_prepare_summary(summary: dict[str, Any]) -> None:
    title = f"dataset {summary['dataset_id']}" + (" (cached)" if summary["cache_hit"] else "")
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for source, fmt in summary["detected_formats"].items():
        table.add_row(f"format of {Path(source).name}", fmt)
    table.add_row("rows read", str(summary["rows_read"]))
    table.add_row("train rows", f"{summary['train_rows']} ({summary['train_samples']} samples)")
    table.add_row("validation rows", str(summary["val_rows"]))
    table.add_row("quarantined", str(summary["quarantined"]))
    for reason, count in summary["filtered"].items():
        if count:
            table.add_row(f"  {reason}", str(count))
    tokens = summary["tokens"]
    table.add_row("tokens (trained)", f"{tokens['total']} ({tokens['trainable']})")
    table.add_row("tokens per row p50 / p95 / max", f"{tokens['p50']} / {tokens['p95']} / {tokens['max']}")
    stdout.print(table)
    stdout.print(f"report: {summary['report']}\nquarantine: {summary['quarantine']}")


@data_app.command("demo")
@handles_errors
def data_demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON Lines file.")],
    rows: Annotated[int, typer.Option("--rows", help="How many rows to generate.")] = 3000,
    as_json: JsonOption = False,
) -> None:
    """Write the built-in demo dataset (structured extraction, generated, deterministic) to a file."""
    from tuneloop.data.demo import write_demo

    path = write_demo(out, rows)
    if as_json:
        emit_json({"path": str(path), "rows": rows})
    else:
        stdout.print(f"wrote {rows} rows to {path}")


@data_app.command("from-feedback")
@handles_errors
def data_from_feedback(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the preference rows (JSON Lines).")],
    config_file: ConfigOptionalOption = None,
    feedback: Annotated[
        list[Path] | None,
        typer.Option("--feedback", help="A ratings file of /v1/feedback (repeatable). Default: serve/feedback.jsonl."),
    ] = None,
    traffic: Annotated[
        list[Path] | None,
        typer.Option(
            "--traffic", help="A traffic log (repeatable: one per gateway replica). Default: serve/traffic.jsonl."
        ),
    ] = None,
    ratings: Annotated[
        list[Path] | None,
        typer.Option("--ratings", help="Human ratings of `tuneloop eval` (EVAL_FOLDER/ratings.jsonl; repeatable)."),
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Ratings given at or after (ISO 8601; UTC).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Ratings given before (ISO 8601; UTC).")] = None,
    max_pairs_per_prompt: Annotated[
        int, typer.Option("--max-pairs-per-prompt", min=1, help="Most pairs made from the answers to one prompt.")
    ] = DEFAULT_MAX_PAIRS_PER_PROMPT,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Preference rows (prompt/chosen/rejected) from the gateway's A/B feedback joined to its traffic log, and from
    human pairwise ratings; provenance beside them in OUT.provenance.json."""
    from tuneloop.data.feedback_pairs import FeedbackInputs, build_preference_rows, parse_moment, write_preference_rows
    from tuneloop.workspace import Workspace

    serve_paths = Workspace.from_env(workspace).serve
    if config_file is not None:
        from tuneloop.config_file import load_config
        from tuneloop.errors import DataError

        state_url = load_config(config_file).serve.state_url
        if state_url and not feedback and not serve_paths.feedback.exists():
            raise DataError(
                f"serve.state_url is {state_url}: the gateways keep their ratings in Redis, not in a file",
                hint="export them: redis-cli -u URL --raw LRANGE tuneloop:feedback:entries 0 -1 > feedback.jsonl, "
                "then pass --feedback feedback.jsonl",
            )
    # The workspace's files are the default, unless only human ratings were asked for and the gateway wrote none.
    default_feedback = [serve_paths.feedback] if serve_paths.feedback.exists() or not ratings else []
    inputs = FeedbackInputs(
        feedback=feedback or default_feedback,
        traffic=traffic or ([serve_paths.traffic] if serve_paths.traffic.exists() else []),
        ratings=ratings or [],
        since=parse_moment(since, "--since") if since else None,
        until=parse_moment(until, "--until") if until else None,
        max_pairs_per_prompt=max_pairs_per_prompt,
    )
    result = build_preference_rows(inputs, console=None if as_json else stderr)
    write_preference_rows(result, out)
    summary = result.summary(out)
    if as_json:
        emit_json(summary)
        return
    for line in summary["malformed_lines"]:
        stderr.print(f"[yellow]skipped[/yellow] {line}")
    _print_feedback_summary(summary)


def _print_feedback_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"preference rows: {summary['out']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    window = summary["window"]
    table.add_row("ratings given", f"{window['first_rating']} .. {window['last_rating']}")
    if window["since"] or window["until"]:
        table.add_row("window", f"{window['since'] or 'beginning'} .. {window['until'] or 'now'}")
    counts = summary["counts"]
    read_human = counts["human_ratings_read"] > 0
    for name, count in counts.items():
        if read_human or not name.startswith("human_"):
            table.add_row(name.replace("_", " "), str(count))
    for reason, count in summary["dropped"].items():
        table.add_row(f"dropped: {reason.replace('_', ' ')}", str(count))
    table.add_row("variants", "\n".join(summary["variants"]))
    table.add_row("rows", str(summary["rows"]))
    stdout.print(table)
    stdout.print(f"provenance: {summary['out']}.provenance.json")


@data_app.command("synth")
@handles_errors
def data_synth(
    config_file: ConfigOption,
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            help="The teacher model: url:http://HOST:PORT/v1#MODEL (any OpenAI-compatible server, a tuneloop "
            "gateway included) or openai:MODEL.",
        ),
    ],
    seed_data: Annotated[
        Path,
        typer.Option(
            "--seed-data", help="Seed tasks (self-instruct) or prompts to answer: any file data prepare reads."
        ),
    ],
    num: Annotated[int, typer.Option("--num", "-n", min=1, help="How many rows to write (at most).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON Lines file to write; provenance goes beside it.")],
    mode: Annotated[
        SynthMode | None,
        typer.Option("--mode", help="self-instruct (new instructions from seed tasks) or answer. Default: data.synth."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Requests in flight. Default: data.synth.concurrency.")
    ] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate instruction data with a served teacher model, filtered like `data prepare`, with provenance."""
    quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.data.synth import synthesize
    from tuneloop.registry.refs import is_api_ref, resolve_api_ref
    from tuneloop.workspace import Workspace

    if not is_api_ref(teacher):
        from tuneloop.errors import TuneloopError

        raise TuneloopError(
            f"--teacher {teacher!r} is not a served model reference",
            hint="write url:http://HOST:PORT/v1#MODEL (serve a local model first: tuneloop serve) or openai:MODEL",
        )
    config = load_config(config_file, overrides)
    result = synthesize(
        config,
        Workspace.from_env(workspace),
        resolve_api_ref(teacher).endpoint,
        teacher,
        seed_data,
        num,
        out,
        mode=mode,
        concurrency=concurrency,
        console=stderr,
    )
    summary = result.summary()
    if as_json:
        emit_json(summary)
        return
    _print_synth_summary(summary)


def _print_synth_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"synthetic rows ({summary['mode']}): {summary['out']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    seeds = summary["seed_data"]
    table.add_row("seed rows usable / read", f"{seeds['rows_usable']} / {seeds['rows_read']}")
    requests = summary["requests"]
    table.add_row("teacher requests (failed)", f"{requests['sent']} ({requests['failed']})")
    usage = summary["usage"]
    table.add_row("tokens prompt / completion", f"{usage['prompt_tokens']} / {usage['completion_tokens']}")
    table.add_row("rounds", str(summary["rounds"]))
    for reason, count in summary["dropped"].items():
        if count:
            table.add_row(f"dropped: {reason.replace('_', ' ')}", str(count))
    if summary["unused_instructions"]:
        table.add_row("instructions unused (--num reached)", str(summary["unused_instructions"]))
    table.add_row("rows written / asked", f"{summary['written']} / {summary['requested']}")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    stdout.print(table)
    stdout.print(f"provenance: {summary['provenance']}")


@data_app.command("export-labelstudio")
@handles_errors
def data_export_labelstudio(
    source: Annotated[
        Path,
        typer.Argument(
            help="Rows to annotate: a prepared dataset's folder, any data file, an evaluation's outputs.jsonl or "
            "the gateway's traffic log.",
            exists=True,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for tasks.json and labeling_config.xml.")],
    mode: Annotated[
        Literal["correct", "pairwise"],
        typer.Option(
            "--mode", help="`correct`: rate and correct one answer; `pairwise`: pick the better of two answers."
        ),
    ] = "correct",
    models: Annotated[
        str | None,
        typer.Option("--models", help="For outputs.jsonl: the model label(s) whose answers to show, e.g. tuned,base."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many tasks.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds which answer is shown as A.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write rows or model answers as Label Studio tasks, with the labeling config to import them with."""
    from tuneloop.data.labelstudio import export_tasks

    labels = [label.strip() for label in models.split(",")] if models else None
    result = export_tasks(source, out, mode, labels, limit, seed)
    summary = {"tasks": str(result.tasks), "config": str(result.config), "count": result.count, "mode": result.mode}
    if as_json:
        emit_json(summary)
        return
    stdout.print(f"wrote {result.count} {result.mode} tasks to {result.tasks}\nlabeling config: {result.config}")
    stdout.print("in Label Studio: create a project with that labeling config, import tasks.json; export as JSON")


@data_app.command("import-labelstudio")
@handles_errors
def data_import_labelstudio(
    export: Annotated[Path, typer.Argument(help="Label Studio's JSON export of the project.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON Lines file for the rows (a data source).")],
    as_json: JsonOption = False,
) -> None:
    """Turn annotations into rows: corrected answers -> SFT rows, choices -> preference rows (what `data prepare`
    also does when a source is the export itself); prints what was kept and dropped."""
    from tuneloop.data.labelstudio import rows_from_export, write_rows

    rows, counts = rows_from_export(export)
    write_rows(rows, out)
    summary = {"rows": str(out), **counts.as_dict()}
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"{export.name} -> {out}", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("tasks", str(counts.tasks))
    table.add_row("SFT rows (corrected or accepted answers)", str(counts.rows["sft"]))
    table.add_row("preference rows (choices)", str(counts.rows["preference"]))
    table.add_row("skipped annotations (dropped)", str(counts.cancelled_annotations))
    for reason, count in sorted(counts.dropped.items()):
        table.add_row(f"tasks without a row: {reason}", str(count))
    stdout.print(table)
