"""Model references -> files. The only place that turns what a user writes into a model to load:

    base                      the config's base model
    NAME@alias, NAME/3, NAME  a registered version (its champion, else its newest, for a bare NAME)
    RUN_ID                    a finished training run in the workspace
    FOLDER                    a PEFT adapter folder or a full Hugging Face model folder

Evaluation, serving, export and cost all ask here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tuneloop.artifacts.training import TrainResult
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


def resolve_model_ref(ref: str, config: LoopConfig, workspace: Workspace, label: str | None = None) -> ModelSpec:
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
