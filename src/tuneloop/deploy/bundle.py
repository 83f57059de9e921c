"""The model folder a deployment carries (`model/` in the deploy folder): the registry version's own files, as
`tuneloop serve` would load them, laid out for a container.

    model/base/               the base model (Hugging Face folder: weights, tokenizer, chat template, generation config)
    model/adapters/NAME-vN/   the version's PEFT adapter (with the tokenizer and chat template training saved)
    model/gguf/base.gguf      CPU targets: the base as GGUF (`serve.llamacpp_quant`), as `tuneloop serve` converts it
    model/gguf/NAME-vN.gguf   CPU targets: the adapter as a LoRA GGUF

Files are hard-linked where the deploy folder shares a file system with the workspace (no copy of the weights).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tuneloop.artifacts.deployment import DeployedModel
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.registry.refs import ModelSpec, resolve_model_ref
from tuneloop.serve.engines.vllm import max_lora_rank
from tuneloop.workspace import Workspace

BASE_DIR = "base"
ADAPTERS_DIR = "adapters"
GGUF_DIR = "gguf"
BASE_GGUF = "base.gguf"


def bundle_model(
    reference: str, config: LoopConfig, workspace: Workspace, folder: Path, *, gguf: bool
) -> DeployedModel:
    """Resolve `reference` through the registry and lay its files out in `folder`; `gguf` adds the llama.cpp files
    CPU targets serve."""
    spec = resolve_model_ref(reference, config, workspace)
    registry_name, version, run_id = _registered(reference, config, workspace)
    if spec.adapter is None:
        raise TuneloopError(
            f"{reference} is a full model; deployments serve LoRA adapters on their base (as `tuneloop serve` does)",
            hint="deploy a LoRA version, or point model.base at the full model and deploy its adapters",
        )
    adapter_dir = f"{registry_name}-v{version}" if registry_name and version else _folder_name(reference)
    _link_tree(spec.base_folder, folder / BASE_DIR)
    _link_tree(spec.adapter, folder / ADAPTERS_DIR / adapter_dir)
    if gguf:
        _bundle_gguf(spec, adapter_dir, config, workspace, folder / GGUF_DIR)
    return DeployedModel(
        reference=reference,
        registry_name=registry_name,
        version=version,
        run_id=run_id or (spec.run.root.name if spec.run is not None else None),
        base_model=config.model.base,
        adapters={reference: adapter_dir},
        lora_rank=max_lora_rank([spec.adapter]),
    )


def _registered(reference: str, config: LoopConfig, workspace: Workspace) -> tuple[str | None, int | None, str | None]:
    """(name, version, run id) when `reference` names a registry version."""
    from tuneloop.registry.store import REFERENCE, Registry

    match = REFERENCE.match(reference)
    if match is None or Path(reference).expanduser().is_dir():
        return None, None, None
    registry = Registry(config, workspace)
    if match["name"] not in registry.names():
        return None, None, None
    info = registry.get(reference)
    return info.name, info.version, info.run_id


def _bundle_gguf(spec: ModelSpec, adapter_dir: str, config: LoopConfig, workspace: Workspace, target: Path) -> None:
    from tuneloop.serve.engines.llamacpp import gguf_for_adapter, gguf_for_base
    from tuneloop.serve.engines.precision import gguf_type

    assert spec.adapter is not None
    target.mkdir(parents=True, exist_ok=True)
    _link(gguf_for_base(spec.base_folder, workspace, gguf_type(config.serve)), target / BASE_GGUF)
    _link(gguf_for_adapter(spec.base_folder, spec.adapter, workspace), target / f"{adapter_dir}.gguf")


def _folder_name(reference: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(reference).name or reference).strip("-.") or "adapter"


def _link(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (copy across file systems); an existing target is replaced."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        if path.is_file():  # follows links: the converted SmolLM2 may sit behind one
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            _link(path.resolve(), destination)
