"""What every command shares: option types, error display (exit 2, JSON with --json), JSON output, consoles."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tuneloop.errors import TuneloopError

ConfigOptionalOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="The loop's YAML config (for the project and tracking URI).")
]

stderr = Console(stderr=True)
stdout = Console()

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The loop's YAML config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set data.seed=7 (repeatable; list items by index)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", help="Workspace folder (default: $TUNELOOP_HOME, else ./.tuneloop).", show_default=False
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def quiet_libraries() -> None:
    """Library logs down to errors, through environment variables: importing Transformers here would make every
    command (even `tuneloop registry list`) pay for it."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes warns on import that its optional `kernels` package is missing; its CPU path works without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# Where --json output goes: the command's stdout, while everything else printed during a --json command (libraries
# that log to stdout, e.g. DeepSpeed on import) is sent to stderr, so stdout holds exactly one JSON document.
_JSON_OUT: contextvars.ContextVar[Any] = contextvars.ContextVar("json_out", default=None)


def handles_errors(function: F) -> F:
    """Show TuneloopError as a clear message (exit 2), as JSON when --json was asked for; with --json, keep stdout
    for the JSON document alone."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        token = _JSON_OUT.set(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                return function(*args, **kwargs)
        except TuneloopError as error:
            if as_json:
                emit_json({"error": error.message, "hint": error.hint, "type": type(error).__name__})
            else:
                # Messages quote other tools (gloo, pip): their brackets are text, not markup.
                stderr.print(f"[bold red]error:[/] {escape(error.message)}", highlight=False)
                if error.hint:
                    stderr.print(f"[yellow]hint:[/] {escape(error.hint)}", highlight=False)
            raise typer.Exit(2) from None
        finally:
            _JSON_OUT.reset(token)

    return wrapper  # type: ignore[return-value]


def emit_json(payload: Any) -> None:
    out = _JSON_OUT.get() or sys.stdout
    out.write(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    out.flush()


def fmt(value: float | None) -> str:
    """A metric for a table: 4 decimals, or "-" when missing."""
    return "-" if value is None else f"{value:.4f}"
