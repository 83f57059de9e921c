"""Choosing and building the serving engine from the config and the models to serve."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.refs import resolve_model_ref
from tuneloop.models import materialize, resolve_base
from tuneloop.serve.engines.base import Engine
from tuneloop.workspace import Workspace


def build_engine(config: LoopConfig, workspace: Workspace, model_refs: list[str], engine: str) -> Engine:
    if engine == "remote":
        from tuneloop.serve.engines.remote import RemoteEngine

        return RemoteEngine(config.serve.remote_urls, config.serve.remote_api_key)
    from pathlib import Path

    from tuneloop.serve.engines.vllm import VllmEngine, default_vllm_python, vllm_available

    vllm_python = Path(config.serve.vllm_python) if config.serve.vllm_python else default_vllm_python()
    if engine == "auto":
        engine = "vllm" if vllm_available(vllm_python) else "transformers"
    if engine not in ("transformers", "vllm"):
        raise TuneloopError(
            f"serve.engine={engine!r} is not available in this version",
            hint="use `transformers` (in-process), `vllm` or `remote`; the llama.cpp engine is being added",
        )
    base_folder = materialize(resolve_base(config.base_model_spec(), workspace))
    adapters = {}
    for ref in model_refs:
        spec = resolve_model_ref(ref, config, workspace)
        if spec.adapter is None:
            raise TuneloopError(f"{ref} is a full model; the in-process engine serves adapters on one base")
        if spec.base_folder.resolve() != base_folder.resolve():
            raise TuneloopError(f"{ref} was trained on {spec.base_folder}, not on the served base {base_folder}")
        adapters[ref] = spec.adapter
    if engine == "vllm":
        return VllmEngine(
            config.model.base,
            base_folder,
            adapters,
            python=vllm_python,
            kv_cache_gib=config.serve.vllm_kv_cache_gib,
            log_file=workspace.root / "serve" / "vllm.log",
        )
    from tuneloop.serve.engines.transformers_engine import TransformersEngine
    from tuneloop.train.device import resolve_precision

    return TransformersEngine(
        config.model.base,
        base_folder,
        adapters,
        resolve_precision(config.serve.precision).torch_dtype,
        max_batch_size=config.serve.max_batch_size,
    )


def run_until_signalled(application: Any, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish in-flight requests (30 s at most) and return, so the
    process exits 0. (uvicorn's own handlers re-raise the signal after draining, which makes the exit status -15.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

            def stop(_signum: int, _frame: Any) -> None:
                self.should_exit = True

            for sig in previous:
                signal.signal(sig, stop)
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(uvicorn.Config(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)).run()
