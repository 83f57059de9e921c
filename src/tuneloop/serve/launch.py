"""Choosing and building the serving engine from the config and the models to serve."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.refs import resolve_model_ref
from tuneloop.models import materialize, resolve_base
from tuneloop.serve.engines.base import Engine
from tuneloop.workspace import Workspace, tree_sha256

log = logging.getLogger("tuneloop.serve")


def build_engine(config: LoopConfig, workspace: Workspace, model_refs: list[str], engine: str) -> Engine:
    if engine == "remote":
        from tuneloop.serve.engines.remote import RemoteEngine

        return RemoteEngine(config.serve.remote_urls, config.serve.remote_api_key)
    from tuneloop.serve.engines.llamacpp import default_llama_server
    from tuneloop.serve.engines.vllm import default_vllm_python

    serve = config.serve
    vllm_python = Path(serve.vllm_python) if serve.vllm_python else default_vllm_python()
    llama_server = Path(serve.llamacpp_server) if serve.llamacpp_server else default_llama_server()
    if engine == "auto":
        engine = choose_engine(vllm_python, llama_server, model_refs)
        log.info("engine auto: chose %s", engine)
    if engine == "llamacpp" and any(ref.endswith(".gguf") for ref in model_refs):
        return _merged_gguf_engine(config, workspace, model_refs, llama_server)
    base_folder = materialize(resolve_base(config.base_model_spec(), workspace))
    adapters = {}
    for ref in model_refs:
        spec = resolve_model_ref(ref, config, workspace)
        if spec.adapter is None:
            raise TuneloopError(f"{ref} is a full model; the engines serve adapters on one base")
        if spec.base_folder.resolve() != base_folder.resolve():
            raise TuneloopError(f"{ref} was trained on {spec.base_folder}, not on the served base {base_folder}")
        adapters[ref] = spec.adapter
    if engine == "vllm":
        from tuneloop.serve.engines.vllm import VllmEngine

        return VllmEngine(
            config.model.base,
            base_folder,
            adapters,
            python=vllm_python,
            kv_cache_gib=serve.vllm_kv_cache_gib,
            dtype={"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[serve.precision],
            log_file=workspace.root / "serve" / "vllm.log",
            zero_lora_dir=workspace.cache / "vllm-zero-lora" / tree_sha256(next(iter(adapters.values())))[:16]
            if adapters
            else None,
        )
    if engine == "llamacpp":
        from tuneloop.serve.engines.llamacpp import LlamaCppEngine, gguf_for_adapter, gguf_for_base

        return LlamaCppEngine(
            config.model.base,
            gguf_for_base(base_folder, workspace, serve.llamacpp_quant),
            {name: gguf_for_adapter(base_folder, adapter, workspace) for name, adapter in adapters.items()},
            _llama_server_or_error(llama_server),
            parallel=serve.llamacpp_parallel,
            threads=serve.llamacpp_threads,
            log_file=workspace.root / "serve" / "llamacpp.log",
        )
    from tuneloop.serve.engines.transformers_engine import TransformersEngine
    from tuneloop.train.device import resolve_precision

    return TransformersEngine(
        config.model.base,
        base_folder,
        adapters,
        resolve_precision(serve.precision).torch_dtype,
        max_batch_size=serve.max_batch_size,
    )


def choose_engine(vllm_python: Path, llama_server: Path | None, model_refs: list[str]) -> str:
    """`auto`: the fastest engine installed. On a CPU llama.cpp first: measured here (docs/benchmarks.md) it gives 2.6x
    vLLM's tokens/s to one user, more at 8 users with lower TTFT, and ~84% of vLLM's at 32 users; it also has no
    mixed-LoRA-batch bug to work around. On a GPU machine vLLM comes first. A GGUF file needs llama.cpp."""
    from tuneloop.train.device import has_cuda

    llama_ok = llama_server is not None and llama_server.exists()
    if any(ref.endswith(".gguf") for ref in model_refs):
        return "llamacpp"
    order = ["vllm", "llamacpp"] if has_cuda() else ["llamacpp", "vllm"]
    available = {"vllm": vllm_python.exists(), "llamacpp": llama_ok}
    return next((name for name in order if available[name]), "transformers")


def _llama_server_or_error(llama_server: Path | None) -> Path:
    if llama_server is None:
        raise TuneloopError(
            "serve.engine=llamacpp but no llama-server was found",
            hint="run `make llamacpp` (builds .llamacpp/bin/llama-server), or set serve.llamacpp_server",
        )
    return llama_server


def _merged_gguf_engine(config: LoopConfig, workspace: Workspace, refs: list[str], server: Path | None) -> Engine:
    """One merged GGUF export (`tuneloop export --format gguf`), served under the name clients give it."""
    from tuneloop.serve.engines.llamacpp import LlamaCppEngine

    if len(refs) != 1:
        raise TuneloopError("a merged GGUF is served alone: pass one --model FILE.gguf")
    path = Path(refs[0]).expanduser()
    if not path.is_file():
        raise TuneloopError(f"no GGUF file at {path}")
    return LlamaCppEngine(
        refs[0],
        path,
        {},
        _llama_server_or_error(server),
        parallel=config.serve.llamacpp_parallel,
        threads=config.serve.llamacpp_threads,
        log_file=workspace.root / "serve" / "llamacpp.log",
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
