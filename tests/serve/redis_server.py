"""A real `redis-server` (Debian's package, installed by `make system-deps`) on a free port of 127.0.0.1, started for
tests and stopped after them: no persistence, its output in a log file beside the test's files."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tuneloop.net import free_port

# No persistence (nothing to clean up), in the foreground (its process is ours to stop), reachable only from here.
SERVER_FLAGS = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no")


@contextmanager
def running_redis(folder: Path) -> Iterator[str]:
    """`redis://127.0.0.1:PORT/0` of a redis-server that lives as long as the context."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (`make system-deps` installs Debian's redis-server)")
    port = free_port()
    log = folder / f"redis-{port}.log"
    with log.open("w", encoding="utf-8") as output:
        process = subprocess.Popen(
            [binary, *SERVER_FLAGS, "--port", str(port), "--dir", str(folder)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
