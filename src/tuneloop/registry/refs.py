"""Model references -> files. The only place that turns what a user writes into a model to load:

    base                      the config's base model
    NAME@alias, NAME/3, NAME  a registered version (its champion, else its newest, for a bare NAME)
    RUN_ID                    a finished training run in the workspace
    FOLDER                    a PEFT adapter folder or a full Hugging Face model folder
    openai:MODEL              an OpenAI model: $OPENAI_BASE_URL (default https://api.openai.com/v1), $OPENAI_API_KEY
    url:BASE_URL#MODEL        any OpenAI-compatible server (vLLM, llama-server, a tuneloop gateway); key from
                              $TUNELOOP_EVAL_API_KEY, else $OPENAI_API_KEY, else none

Evaluation, serving, export and cost all ask here. The last two forms are API models (`ApiModel`): only evaluation
takes them (as evaluated models and as the judge), through `resolve_eval_model`; the others are files (`ModelSpec`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tuneloop.artifacts.training import TrainResult
from tuneloop.chat_client import ChatEndpoint
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import configured_base, materialize
from tuneloop.workspace import RunPaths, Workspace


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # what the user wrote
    label: str  # short name in reports: "base", "tuned", or the ref
    base_folder: Path  # HF folder of the base weights
    adapter: Path | None = None  # PEFT adapter folder, if any
    full_model: Path | None = None  # fully fine-tuned weights, if any
    run: RunPaths | None = None  # the training run, when the ref is one (or a version registered from one)
    trust_remote_code: bool = False  # `model.trust_remote_code`, for whoever loads it

    @property
    def weights(self) -> Path:
        return self.full_model or self.base_folder

    @property
    def tokenizer_folder(self) -> Path:
        """Adapters and full models are saved with their tokenizer and chat template."""
        return self.adapter or self.weights


API_PREFIXES = ("openai:", "url:")
OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class ApiModel:
    """A model behind an OpenAI-compatible API: nothing to load, answers come over HTTP."""

    ref: str  # what the user wrote
    label: str  # short name in reports
    endpoint: ChatEndpoint
    provider: str  # `openai` or `url`

    @property
    def price_names(self) -> list[str]:
        """`api:` entries of the price table that may price this model, most specific first."""
        model = self.endpoint.model
        return [f"{self.provider}-{model}", model, self.ref] if self.provider == "openai" else [model, self.ref]


def is_api_ref(ref: str) -> bool:
    return ref.startswith(API_PREFIXES)


def resolve_api_ref(ref: str, label: str | None = None, environ: Mapping[str, str] | None = None) -> ApiModel:
    """`openai:MODEL` or `url:http://host:port/v1#MODEL` -> an `ApiModel` (keys read from `environ`, default the
    process environment)."""
    environ = os.environ if environ is None else environ
    if ref.startswith("openai:"):
        model = ref.removeprefix("openai:").strip()
        if not model:
            raise TuneloopError(
                f"model reference {ref!r} names no model", hint="write openai:MODEL, e.g. openai:gpt-4o-mini"
            )
        key = environ.get("OPENAI_API_KEY")
        if not key:
            raise TuneloopError(
                f"{ref} needs an API key: $OPENAI_API_KEY is not set",
                hint="export OPENAI_API_KEY=... (and OPENAI_BASE_URL for an OpenAI-compatible provider)",
            )
        base_url = (environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        return ApiModel(ref, label or _api_label(model), ChatEndpoint(base_url, model, key, label or ""), "openai")
    if ref.startswith("url:"):
        base_url, hash_sign, model = ref.removeprefix("url:").partition("#")
        base_url, model = base_url.strip().rstrip("/"), model.strip()
        if not hash_sign or not model:
            raise TuneloopError(
                f"model reference {ref!r} names no model after `#`",
                hint="write url:http://HOST:PORT/v1#MODEL (MODEL as the server lists it at /v1/models)",
            )
        if not re.match(r"https?://[^/\s]+", base_url):
            raise TuneloopError(
                f"model reference {ref!r}: {base_url!r} is not an http(s) URL",
                hint="write url:http://HOST:PORT/v1#MODEL",
            )
        key = environ.get("TUNELOOP_EVAL_API_KEY") or environ.get("OPENAI_API_KEY") or None
        return ApiModel(ref, label or _api_label(model), ChatEndpoint(base_url, model, key, label or ""), "url")
    raise TuneloopError(f"{ref!r} is not an API model reference", hint="write openai:MODEL or url:BASE_URL#MODEL")


def _api_label(model: str) -> str:
    """A report label from a model name: its last path part (servers often name models by path), file-name safe."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "api"


def resolve_eval_model(
    ref: str, config: LoopConfig, workspace: Workspace, label: str | None = None
) -> ModelSpec | ApiModel:
    """What evaluation can take: an API model, or anything `resolve_model_ref` resolves."""
    if is_api_ref(ref):
        return resolve_api_ref(ref, label)
    return resolve_model_ref(ref, config, workspace, label)


def resolve_model_ref(ref: str, config: LoopConfig, workspace: Workspace, label: str | None = None) -> ModelSpec:
    if is_api_ref(ref):
        raise TuneloopError(
            f"{ref} is an API model: only `tuneloop eval` (--model, --compare, --judge) takes one",
            hint="serve, export and cost need files: pass `base`, a run id, a registry reference or a folder",
        )
    spec = _resolve(ref, config, workspace, label)
    return replace(spec, trust_remote_code=config.model.trust_remote_code)


def _resolve(ref: str, config: LoopConfig, workspace: Workspace, label: str | None) -> ModelSpec:
    if ref == "base":
        return ModelSpec(ref, label or "base", materialize(configured_base(config, workspace)))
    run = workspace.run(ref) if "/" not in ref and "@" not in ref else None
    if run is not None and run.summary.exists():
        result = TrainResult.load(run.summary)
        return replace(_from_folder(result.output, ref, label or "tuned", config, workspace), run=run)
    if run is not None and run.record.exists():
        raise TuneloopError(f"run {ref!r} has not finished", hint="resume it: tuneloop train -c CONFIG --resume")
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return _from_folder(folder.resolve(), ref, label or folder.name, config, workspace)
    registered = _from_registry(ref, config, workspace, label)
    if registered is not None:
        return registered
    raise TuneloopError(
        f"model {ref!r} is not `base`, a registry reference, a run id in {workspace.runs}, or a model/adapter folder",
        hint="see `tuneloop registry list` and " + str(workspace.runs),
    )


def _from_registry(ref: str, config: LoopConfig, workspace: Workspace, label: str | None) -> ModelSpec | None:
    from tuneloop.registry.store import REFERENCE, Registry

    match = REFERENCE.match(ref)
    if not match:
        return None
    registry = Registry(config, workspace)
    if match["name"] not in registry.names():
        return None
    info = registry.get(ref)
    spec = _from_folder(Path(info.artifact_path), ref, label or "tuned", config, workspace)
    run = workspace.run(info.run_id) if info.run_id else None
    return replace(spec, run=run if run is not None and run.root.exists() else None)


def _from_folder(folder: Path, ref: str, label: str, config: LoopConfig, workspace: Workspace) -> ModelSpec:
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        base_path = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        base_folder = Path(base_path) if base_path and Path(base_path).is_dir() else None
        if base_folder is None:
            base_folder = materialize(configured_base(config, workspace))
        return ModelSpec(ref, label, base_folder, adapter=folder)
    if (folder / "config.json").exists():
        return ModelSpec(ref, label, folder, full_model=folder)
    raise TuneloopError(f"{folder} holds neither a PEFT adapter nor a Hugging Face model")
