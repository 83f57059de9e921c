"""`tuneloop dvc init|value`: the loop as a DVC pipeline (`dvc.yaml`), and the helper its stage commands use to read
a step result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tuneloop.cli import dvc_app
from tuneloop.cli.common import (
    ConfigOption,
    JsonOption,
    WorkspaceOption,
    emit_json,
    handles_errors,
    stdout,
)


@dvc_app.command("init")
@handles_errors
def dvc_init(
    config_file: ConfigOption,
    folder: Annotated[
        Path, typer.Option("--dir", help="Where to write dvc.yaml (inside a git + DVC repository).", file_okay=False)
    ] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing dvc.yaml.")] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write dvc.yaml: prepare -> train -> eval -> register as DVC stages, with the config's sections as params and
    the workspace's datasets as a versioned output, so `dvc repro` reruns what changed and `dvc push` versions data."""
    from tuneloop.config_file import load_config
    from tuneloop.pipeline.dvc import write_dvc_pipeline
    from tuneloop.workspace import Workspace

    config = load_config(config_file)
    pipeline = write_dvc_pipeline(config, config_file, Workspace.from_env(workspace), folder, force=force)
    summary = pipeline.summary()
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"{summary['dvc_file']}")
    for column in ("stage", "params", "deps", "outs"):
        table.add_column(column)
    for name, stage in summary["stages"].items():
        table.add_row(name, ", ".join(stage["params"]), "\n".join(stage["deps"]), "\n".join(stage["outs"]))
    stdout.print(table)
    stdout.print("next: [bold]dvc repro[/] (then git add dvc.yaml dvc.lock tuneloop-steps; dvc push)")


@dvc_app.command("value")
@handles_errors
def dvc_value(
    file: Annotated[Path, typer.Argument(help="A step result (tuneloop-steps/*.json) or the YAML config.")],
    key: Annotated[str, typer.Argument(help="A dotted key, e.g. run_id or registry.name.")],
) -> None:
    """Print one value of a step result or config file (stage commands pass the trained run id on with it)."""
    from tuneloop.pipeline.dvc import read_value

    typer.echo(read_value(file, key))
