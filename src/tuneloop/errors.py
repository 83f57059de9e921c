"""User-facing errors: what went wrong, where, and what to do about it."""

from __future__ import annotations


class TuneloopError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    `hint` says what to do next; the CLI prints it under the message and puts both in `--json` output.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class ConfigError(TuneloopError):
    """The config file (or a --set override) is invalid."""


class DataError(TuneloopError):
    """A data source cannot be read at all (unreadable or empty file, unknown format)."""


class ModelResolutionError(TuneloopError):
    """`model.base` does not name a model tuneloop can find on this machine."""
