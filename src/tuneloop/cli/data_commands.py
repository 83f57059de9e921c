"""`tuneloop data prepare|demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tuneloop.cli import data_app
from tuneloop.cli.common import (
    ConfigOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    handles_errors,
    quiet_libraries,
    stderr,
    stdout,
)


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
