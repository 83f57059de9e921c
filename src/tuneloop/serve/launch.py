"""Building the gateway from the config: the engine (chosen and started per `serve`), the models it serves (resolved
through the registry), the A/B router, the stores under the workspace, and running it until signalled."""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import EngineName, LoopConfig, ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.keys import zero_lora_key
from tuneloop.models import configured_base, materialize, max_context
from tuneloop.registry.refs import resolve_model_ref
from tuneloop.serve.engines.base import Engine, adapter_chat_template
from tuneloop.workspace import Workspace

log = logging.getLogger("tuneloop.serve")


@dataclass
class Gateway:
    """A built gateway: the ASGI app and what it serves, ready for `run_until_signalled`."""

    app: Any
    engine: Engine
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def build_gateway(
    config: LoopConfig,
    workspace: Workspace,
    models: list[str] | None = None,
    engine: EngineName | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Gateway:
    """`tuneloop serve`: the gateway for `config.serve`, with `models` (default `serve.models`) and every A/B
    variant served beside the base; `engine`, `host`, `port` override the config."""
    from tuneloop.serve.gateway.app import create_app
    from tuneloop.serve.gateway.routing import Router
    from tuneloop.serve.gateway.stores import open_stores
    from tuneloop.serve.gateway.traffic import TrafficLog

    settings = config.serve
    stores = open_stores(
        settings.state_url, workspace.serve, settings.batch_concurrency
    )  # first: a wrong serve.state_url fails before any engine
    variants = [variant for route in settings.routes.values() for variant in route.variants]
    wanted = [ref for ref in dict.fromkeys([*(models or settings.models), *variants]) if ref != config.model.base]
    chosen = engine or settings.engine
    # A remote engine's context is its replicas' business; the others get the base model's bound.
    context = settings.max_model_len if chosen == "remote" else _context_limit(config, workspace)
    engine_instance = build_engine(config, workspace, [] if chosen == "remote" else wanted, chosen, context)
    app = create_app(
        engine_instance,
        settings,
        api_keys=settings.api_keys + [key for key in os.environ.get("TUNELOOP_API_KEYS", "").split(",") if key],
        context_limit=context,
        router=Router(settings.routes, seed=config.project.seed),
        feedback_store=stores.feedback,
        batch_store=stores.batches,
        rate_buckets=stores.buckets,
        workspace=workspace,
        registry=_registry_opener(config, workspace),
        rubric=config.eval.rubric,
        traffic_log=TrafficLog(workspace.serve.traffic) if settings.log_traffic else None,
    )
    return Gateway(app, engine_instance, host or settings.host, port or settings.port)


def _registry_opener(config: LoopConfig, workspace: Workspace) -> Any:
    """Opens the model registry once, on first use (the dashboard, the eval gauges on /metrics)."""

    @functools.cache
    def open_registry() -> Any:
        from tuneloop.registry.store import Registry  # MLflow is imported only when needed

        return Registry(config, workspace)

    return open_registry


def _context_limit(config: LoopConfig, workspace: Workspace) -> int:
    """`serve.max_model_len`, capped at the base model's own maximum."""
    base = configured_base(config, workspace)
    own = max_context(materialize(base)) if base.kind != "hub" else None
    return min(config.serve.max_model_len, own) if own else config.serve.max_model_len


def build_engine(
    config: LoopConfig, workspace: Workspace, model_refs: list[str], engine: EngineName, context: int
) -> Engine:
    """The engine serving the base and `model_refs`; `context` is the longest request in tokens."""
    settings = config.serve
    if engine == "remote":
        from tuneloop.serve.engines.llamacpp import lora_request_fields
        from tuneloop.serve.engines.remote import RemoteEngine

        overrides = lora_request_fields(config.model.base, settings.remote_llamacpp_adapters)
        return RemoteEngine(settings.remote_urls, settings.remote_api_key, request_overrides=overrides)
    from tuneloop.serve.engines.llamacpp import default_llama_server
    from tuneloop.serve.engines.vllm import default_vllm_python

    vllm_python = Path(settings.vllm_python) if settings.vllm_python else default_vllm_python()
    llama_server = Path(settings.llamacpp_server) if settings.llamacpp_server else default_llama_server()
    if engine == "auto":
        engine = choose_engine(vllm_python, llama_server, model_refs, settings)
    if engine == "llamacpp" and any(ref.endswith(".gguf") for ref in model_refs):
        return _merged_gguf_engine(settings, workspace, model_refs, llama_server)
    base_folder = materialize(configured_base(config, workspace))
    adapters = _adapters(config, workspace, model_refs, base_folder)
    if engine == "vllm":
        from tuneloop.serve.engines.vllm import VllmEngine

        return VllmEngine(
            settings,
            config.model.base,
            base_folder,
            adapters,
            python=vllm_python,
            max_model_len=context,
            log_file=workspace.serve.log("vllm"),
            zero_lora_dir=workspace.zero_lora_cache(zero_lora_key(next(iter(adapters.values())))) if adapters else None,
        )
    if engine == "llamacpp":
        from tuneloop.serve.engines.llamacpp import LlamaCppEngine, gguf_for_adapter, gguf_for_base
        from tuneloop.serve.engines.precision import gguf_type

        return LlamaCppEngine(
            settings,
            config.model.base,
            gguf_for_base(base_folder, workspace, gguf_type(settings)),
            {name: gguf_for_adapter(base_folder, adapter, workspace) for name, adapter in adapters.items()},
            _llama_server_or_error(llama_server),
            max_model_len=context,
            log_file=workspace.serve.log("llamacpp"),
            chat_template=adapter_chat_template(base_folder, adapters.values()),
        )
    from tuneloop.serve.engines.precision import serving_precision
    from tuneloop.serve.engines.transformers_engine import TransformersEngine

    dtype = serving_precision(settings).torch_dtype
    return TransformersEngine(
        settings, config.model.base, base_folder, adapters, dtype, trust_remote_code=config.model.trust_remote_code
    )


def _adapters(config: LoopConfig, workspace: Workspace, refs: list[str], base_folder: Path) -> dict[str, Path]:
    """Served name -> adapter folder; every adapter must sit on the served base."""
    adapters = {}
    for ref in refs:
        spec = resolve_model_ref(ref, config, workspace)
        if spec.adapter is None:
            raise TuneloopError(f"{ref} is a full model; the engines serve adapters on one base")
        if spec.base_folder.resolve() != base_folder.resolve():
            raise TuneloopError(f"{ref} was trained on {spec.base_folder}, not on the served base {base_folder}")
        adapters[ref] = spec.adapter
    return adapters


def choose_engine(
    vllm_python: Path, llama_server: Path | None, model_refs: list[str], settings: ServeConfig | None = None
) -> EngineName:
    """`auto`: the fastest engine installed, in the order serve/engines/precision.py ranks them for this machine's
    device and precision (one resolver for every engine). A GGUF file needs llama.cpp."""
    from tuneloop.serve.engines.precision import engine_ranking

    if any(ref.endswith(".gguf") for ref in model_refs):
        return "llamacpp"
    available = {
        "vllm": vllm_python.exists(),
        "llamacpp": llama_server is not None and llama_server.exists(),
        "transformers": True,
    }
    for name, why in engine_ranking(settings or ServeConfig()):
        if available[name]:
            log.info("engine auto: %s (%s)", name, why)
            return name  # type: ignore[return-value]
    return "transformers"


def _llama_server_or_error(llama_server: Path | None) -> Path:
    if llama_server is None:
        raise TuneloopError(
            "serve.engine=llamacpp but no llama-server was found",
            hint="run `make llamacpp` (builds .llamacpp/bin/llama-server), or set serve.llamacpp_server",
        )
    return llama_server


def _merged_gguf_engine(settings: ServeConfig, workspace: Workspace, refs: list[str], server: Path | None) -> Engine:
    """One merged GGUF export (`tuneloop export --format gguf`), served under the name clients give it."""
    from tuneloop.serve.engines.llamacpp import LlamaCppEngine

    if len(refs) != 1:
        raise TuneloopError("a merged GGUF is served alone: pass one --model FILE.gguf")
    path = Path(refs[0]).expanduser()
    if not path.is_file():
        raise TuneloopError(f"no GGUF file at {path}")
    return LlamaCppEngine(
        settings,
        refs[0],
        path,
        {},
        _llama_server_or_error(server),
        max_model_len=settings.max_model_len,
        log_file=workspace.serve.log("llamacpp"),
    )


def run_until_signalled(gateway: Gateway) -> None:
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

    config = uvicorn.Config(
        gateway.app, host=gateway.host, port=gateway.port, log_level="warning", timeout_graceful_shutdown=30
    )
    Server(config).run()
