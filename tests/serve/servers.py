"""Starting real `tuneloop serve` processes on 127.0.0.1 for tests, and waiting until they are ready."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.net import free_port, wait_until_ready


def start_serve(config: Path, workspace: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`tuneloop serve -c CONFIG` on a free port; its output is kept for failure messages."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneloop.cli", "serve", "-c", str(config), "--port", str(port), *extra],
        env={**os.environ, "TUNELOOP_HOME": str(workspace)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen[str], seconds: float = 180, log: Path | None = None) -> None:
    outcome = wait_until_ready(url, process, seconds)
    if outcome == "exited":
        extra = log.read_text()[-3000:] if log is not None and log.exists() else ""
        pytest.fail(
            f"{url} exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}\n{extra}"
        )
    if outcome == "timeout":
        process.kill()
        pytest.fail(f"{url} not ready in {seconds:.0f} s")
