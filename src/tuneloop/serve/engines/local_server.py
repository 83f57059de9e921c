"""Engines that run an OpenAI-compatible server as a child process (vLLM, llama.cpp's llama-server): start it on a
free port, wait for its /health, talk to it through the remote engine, and stop it after the gateway drained."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from abc import abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError
from tuneloop.net import free_port
from tuneloop.serve.engines.base import Engine, GenerationChunk, GenerationRequest, MetricsSource
from tuneloop.serve.engines.remote import RemoteEngine


class LocalServerEngine(Engine):
    #: what to run to get the server (a hint shown when it is missing)
    install_hint: str = ""
    passthrough = True

    def __init__(self, executable: Path, start_timeout: float, log_file: Path | None) -> None:
        self.executable = executable
        self.start_timeout = start_timeout
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.remote: RemoteEngine | None = None

    @abstractmethod
    def command(self, port: int) -> list[str]:
        """The server's command line, listening on 127.0.0.1:port."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def request_overrides(self) -> dict[str, dict[str, Any]]:
        """Per served model name, request fields that select it on the server (default: none)."""
        return {}

    def stats(self) -> dict[str, Any]:
        return {"pid": self.process.pid if self.process else None, **(self.remote.stats() if self.remote else {})}

    def metrics_sources(self) -> list[MetricsSource]:
        # One server on a private port: its series need no replica label.
        return [MetricsSource(source.url) for source in self.remote.metrics_sources()] if self.remote else []

    async def start(self) -> None:
        if not self.executable.exists():
            raise TuneloopError(f"{self.name}: {self.executable} not found", hint=self.install_hint)
        port = free_port()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with (self.log_file or Path(os.devnull)).open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                self.command(port), env=self.environment(), stdout=log, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + self.start_timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TuneloopError(
                        f"{self.name} exited with status {self.process.returncode} while starting",
                        hint=f"see its log: {self.log_file}" if self.log_file else None,
                    )
                try:  # both servers answer /health with 503 (or not at all) while loading
                    if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
            else:
                await self.stop()
                raise TuneloopError(f"{self.name} did not become healthy in {self.start_timeout:.0f} s")
        self.remote = RemoteEngine([url], request_overrides=self.request_overrides())
        await self.remote.start()

    async def stop(self) -> None:
        if self.remote is not None:
            await self.remote.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.remote is None:
            raise TuneloopError(f"the {self.name} engine is not started")
        return self.remote.generate(request)

    def stream_events(self, request: GenerationRequest) -> AsyncIterator[bytes]:
        if self.remote is None:
            raise TuneloopError(f"the {self.name} engine is not started")
        return self.remote.stream_events(request)
