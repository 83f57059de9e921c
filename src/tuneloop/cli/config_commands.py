"""`tuneloop config validate|schema|docs`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli import config_app
from tuneloop.cli.common import (
    JsonOption,
    SetOption,
    emit_json,
    handles_errors,
    stdout,
)


@config_app.command("validate")
@handles_errors
def config_validate(
    file: Annotated[Path, typer.Argument(help="The YAML config to check.")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a config file: unknown keys and wrong types are reported with their field path."""
    from tuneloop.config_file import load_config

    config = load_config(file, overrides)
    if as_json:
        emit_json({"valid": True, "config": config.model_dump(mode="json")})
    else:
        stdout.print(f"[green]ok[/]: {file} is a valid tuneloop config")


@config_app.command("schema")
@handles_errors
def config_schema(as_json: JsonOption = True) -> None:
    """Print the config's JSON schema (every field with its type, default and description)."""
    from tuneloop.config import LoopConfig

    emit_json(LoopConfig.model_json_schema())


@config_app.command("docs")
@handles_errors
def config_docs(as_json: JsonOption = False) -> None:
    """Print the config reference as Markdown (this is how docs/config.md is made)."""
    from tuneloop.config_docs import config_reference

    text = config_reference()
    if as_json:
        emit_json({"markdown": text})
    else:
        sys.stdout.write(text)
