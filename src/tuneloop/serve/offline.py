"""An engine for evaluation: one llama.cpp or vLLM server started as `tuneloop serve` starts it (the base model with
the evaluated adapters loaded, switched per request), without the gateway, on a free 127.0.0.1 port; each evaluated
model becomes a `ChatEndpoint` straight at the engine's OpenAI API, for `chat_generate`.

Why: in-process `generate` decodes one padded batch at a time; the engines batch continuously (llama-server: ~350
tokens/s at 16-32 concurrent requests on 2 cores, docs/serving.md), so evaluation generation runs at serving speed.

Precision follows `eval.precision` as `tuneloop.device` resolves it, so answers compare with the in-process path:
llama.cpp gets an f32 (or bf16) GGUF, never the quantized one `serve.llamacpp_quant` defaults to; vLLM gets the
same `--dtype`. Perplexity and anything else that needs logits stays in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Literal

from rich.console import Console

from tuneloop.chat_client import ChatEndpoint
from tuneloop.config import LoopConfig
from tuneloop.device import resolve_precision
from tuneloop.errors import TuneloopError
from tuneloop.registry.refs import ModelSpec
from tuneloop.serve.engines.llamacpp import LlamaCppEngine, default_llama_server
from tuneloop.serve.engines.local_server import LocalServerEngine
from tuneloop.serve.engines.vllm import VllmEngine, default_vllm_python
from tuneloop.serve.launch import _context_limit, build_engine, choose_engine
from tuneloop.workspace import Workspace

EvalEngineName = Literal["llamacpp", "vllm"]

_INSTALL_HINTS = {"llamacpp": LlamaCppEngine.install_hint, "vllm": VllmEngine.install_hint}


def available_eval_engine(config: LoopConfig, specs: list[ModelSpec] | None = None) -> EvalEngineName | None:
    """The engine `eval.engine` asks for: `inprocess` -> None; `llamacpp`/`vllm` -> that name (engine_endpoints
    says what to install when it is missing); `auto` -> the fastest one installed (`choose_engine`'s order: llama.cpp
    first on a CPU, vLLM first on a GPU), or None when none is, or when a model in `specs` is a full fine-tune (the
    engines serve adapters on one base)."""
    wanted = config.eval.engine
    if wanted == "inprocess":
        return None
    if wanted != "auto":
        return wanted
    if specs and any(spec.full_model is not None for spec in specs):
        return None
    return _fastest_installed(config)


def _fastest_installed(config: LoopConfig) -> EvalEngineName | None:
    chosen = choose_engine(_vllm_python(config), _llama_server(config), [], config.serve)
    return "llamacpp" if chosen == "llamacpp" else "vllm" if chosen == "vllm" else None


def eval_concurrency(config: LoopConfig, engine: str) -> int:
    """Requests to keep in flight (`chat_generate(concurrency=...)`): llama-server decodes `serve.llamacpp_parallel`
    slots together (more would queue); vLLM schedules its own batches and was fastest at 32 concurrent here
    (docs/serving.md)."""
    return config.serve.llamacpp_parallel if engine == "llamacpp" else 32


def local_eval_engine(
    config: LoopConfig, workspace: Workspace, console: Console | None = None
) -> Callable[[list[ModelSpec]], AbstractContextManager[dict[str, ChatEndpoint]]]:
    """What `run_evaluation(local_engine=...)` takes: given the evaluated local models, the engine serving them
    (`eval.engine`, available_eval_engine), or nothing to serve them with (in-process)."""

    def serve(specs: list[ModelSpec]) -> AbstractContextManager[dict[str, ChatEndpoint]]:
        engine = available_eval_engine(config, specs)
        if console is not None:
            console.print(f"generation: {engine or 'in-process'} (eval.engine: {config.eval.engine})")
        return _engine_or_in_process(specs, config, workspace, engine, console) if engine else nullcontext({})

    return serve


@contextmanager
def _engine_or_in_process(
    specs: list[ModelSpec], config: LoopConfig, workspace: Workspace, engine: str, console: Console | None
) -> Iterator[dict[str, ChatEndpoint]]:
    """The engine's endpoints; under `eval.engine: auto`, in-process (no endpoints) when the engine cannot serve these
    models (a tokenizer llama.cpp's converter does not know, say): `auto` must never make an evaluation fail."""
    with ExitStack() as stack:
        try:
            endpoints = stack.enter_context(engine_endpoints(specs, config, workspace, engine))
        except TuneloopError as error:
            if config.eval.engine != "auto":
                raise
            if console is not None:
                console.print(f"[yellow]{engine} cannot serve these models ({error.message}): generating in-process")
            endpoints = {}
        yield endpoints


@contextmanager
def engine_endpoints(
    specs: list[ModelSpec], config: LoopConfig, workspace: Workspace, engine: str = "auto"
) -> Iterator[dict[str, ChatEndpoint]]:
    """Start one engine serving the base with every adapter in `specs`, yield {spec.label: ChatEndpoint} (the base
    under the base model's name, an adapter under its ref, with the request fields that select it), and stop the
    engine on exit. `engine`: `llamacpp`, `vllm`, or `auto` (available_eval_engine; an error when none is
    installed: falling back to in-process is the caller's decision, made with available_eval_engine first)."""
    name = _engine_name(config, specs, engine)
    _check_installed(config, name)
    refs = list(dict.fromkeys(spec.ref for spec in specs if spec.adapter is not None))
    # eval.precision as resolved: llama.cpp then runs that float GGUF and vLLM that dtype (serve/engines/precision.py).
    serve = config.serve.model_copy(
        update={"llamacpp_quant": "auto", "precision": resolve_precision(config.eval.precision).name}
    )
    engine_config = config.model_copy(update={"serve": serve})
    server = build_engine(engine_config, workspace, refs, name, _context_limit(config, workspace))
    assert isinstance(server, LocalServerEngine)  # llamacpp and vllm both run a local server
    loop = asyncio.new_event_loop()  # the engine's HTTP client lives on one loop from start to stop
    try:
        loop.run_until_complete(server.start())
        yield _endpoints(server, specs)
    finally:
        loop.run_until_complete(server.stop())
        loop.close()


def _engine_name(config: LoopConfig, specs: list[ModelSpec], engine: str) -> EvalEngineName:
    full = [spec.ref for spec in specs if spec.full_model is not None]
    if full:
        raise TuneloopError(
            f"{', '.join(full)}: a full fine-tune; the evaluation engines serve adapters on one base",
            hint="evaluate it with eval.engine: inprocess",
        )
    if engine == "auto":
        chosen = _fastest_installed(config)
        if chosen is None:
            raise TuneloopError(
                "no evaluation engine is installed",
                hint=f"{_INSTALL_HINTS['llamacpp']}; or {_INSTALL_HINTS['vllm']}; or set eval.engine: inprocess",
            )
        return chosen
    if engine not in _INSTALL_HINTS:
        raise TuneloopError(f"unknown evaluation engine {engine!r}", hint="one of: auto, llamacpp, vllm")
    return engine  # type: ignore[return-value]


def _check_installed(config: LoopConfig, name: EvalEngineName) -> None:
    """Before any GGUF conversion: say what to install."""
    found = _llama_server(config) if name == "llamacpp" else _vllm_python(config)
    if found is None or not found.exists():
        raise TuneloopError(f"eval engine {name}: {found or 'llama-server'} not found", hint=_INSTALL_HINTS[name])


def _endpoints(server: LocalServerEngine, specs: list[ModelSpec]) -> dict[str, ChatEndpoint]:
    """One endpoint per spec: the engine's URL, the served name's `model` field and any other selecting fields
    (llama.cpp: `lora` scales; vLLM on CPU: the base through its all-zero LoRA), as the gateway would send them."""
    if server.remote is None:
        raise TuneloopError(f"the {server.name} engine is not started")
    url = server.remote.replicas[0].url  # ends with /v1
    base_name = server.models()[0].name
    overrides = server.request_overrides()
    endpoints = {}
    for spec in specs:
        served = base_name if spec.adapter is None else spec.ref
        fields = dict(overrides.get(served, {}))
        model = str(fields.pop("model", served))
        endpoints[spec.label] = ChatEndpoint(url, model, label=spec.label, extra_body=fields or None)
    return endpoints


def _llama_server(config: LoopConfig) -> Path | None:
    return Path(config.serve.llamacpp_server) if config.serve.llamacpp_server else default_llama_server()


def _vllm_python(config: LoopConfig) -> Path:
    return Path(config.serve.vllm_python) if config.serve.vllm_python else default_vllm_python()
