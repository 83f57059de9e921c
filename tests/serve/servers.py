"""Starting real `tuneloop serve` processes on 127.0.0.1 for tests, and waiting until they are ready.

A server's stdout and stderr go to a log file beside its workspace, never to a pipe: nobody reads a pipe while the
tests run, and a busy server blocks once the pipe's buffer (64 KiB) is full. Failure messages show the log's tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.net import free_port, wait_until_ready

TAIL_CHARS = 3000


class ServeProcess(subprocess.Popen[str]):
    """A started `tuneloop serve`, with the file its output goes to."""

    log: Path


def start_serve(config: Path, workspace: Path, *extra: str) -> tuple[ServeProcess, str]:
    """`tuneloop serve -c CONFIG` on a free port; its output goes to `serve-PORT.log` beside the workspace."""
    port = free_port()
    log = workspace.parent / f"serve-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as output:  # the child keeps its own descriptor
        process = ServeProcess(
            [sys.executable, "-m", "tuneloop.cli", "serve", "-c", str(config), "--port", str(port), *extra],
            env={**os.environ, "TUNELOOP_HOME": str(workspace)},
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    process.log = log
    return process, f"http://127.0.0.1:{port}"


def log_tail(path: Path | None, chars: int = TAIL_CHARS) -> str:
    """The end of a log file, or "" when there is none."""
    if path is None or not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


def server_output(process: subprocess.Popen[str]) -> str:
    """The tail of what a server started by start_serve printed, for failure messages."""
    return log_tail(getattr(process, "log", None))


def wait_ready(url: str, process: subprocess.Popen[str], seconds: float = 180, log: Path | None = None) -> None:
    """Wait until `url`/ready answers 200; fail with the server's output (and the tail of `log`, an engine's own log
    such as llama-server's) when it exits or is not ready in `seconds`."""
    outcome = wait_until_ready(url, process, seconds)
    if outcome == "ready":
        return
    if outcome == "timeout":
        process.kill()
        process.wait(timeout=30)
    engine_log = f"\n--- {log} ---\n{log_tail(log)}" if log is not None and log.exists() else ""
    status = f"exited with {process.returncode}" if outcome == "exited" else f"not ready in {seconds:.0f} s"
    pytest.fail(f"{url} {status}:\n{server_output(process)}{engine_log}")
