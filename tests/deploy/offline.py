"""Shared by the check scripts that run in the deploy tools' virtualenvs (modal_check, runpod_check,
sagemaker_check; imported as `offline`, the scripts' own folder being on sys.path): every network connection refused
and recorded, so a check proves the platform's SDK builds its objects without contacting the platform; and loading a
generated module from its file."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

connections: list[str] = []


def refuse_network(checker: str) -> list[str]:
    """From now on every socket connection raises; returns the list each attempt is recorded in."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        connections.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
        raise ConnectionRefusedError(f"{checker}: no network while checking the generated code")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    return connections


def load(path: Path) -> ModuleType:
    """Import a generated Python file as a module named after it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
