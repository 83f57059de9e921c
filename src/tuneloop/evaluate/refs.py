"""Model references for evaluation: `base`, a run id, an adapter folder, or a full model folder.

(Registry references such as `NAME@champion` join here once the registry exists: the registry is the only place
that turns a name into files.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import materialize, resolve_base
from tuneloop.workspace import Workspace


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # what the user wrote
    label: str  # short name in reports: "base", "tuned", or the ref
    base_folder: Path  # HF folder of the base weights
    adapter: Path | None = None  # PEFT adapter folder, if any
    full_model: Path | None = None  # fully fine-tuned weights, if any
    run_dir: Path | None = None  # the training run, when the ref is one

    @property
    def weights(self) -> Path:
        return self.full_model or self.base_folder


def resolve_model_ref(ref: str, config: LoopConfig, workspace: Workspace, label: str | None = None) -> ModelSpec:
    if ref == "base":
        base = resolve_base(config.base_model_spec(), workspace)
        return ModelSpec(ref, label or "base", materialize(base))
    run_dir = workspace.run_dir(ref)
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        spec = _from_folder(
            Path(summary["adapter_path"] or summary["model_path"]), ref, label or "tuned", config, workspace
        )
        return ModelSpec(spec.ref, spec.label, spec.base_folder, spec.adapter, spec.full_model, run_dir)
    if (run_dir / "run.json").exists():
        raise TuneloopError(f"run {ref!r} has not finished", hint="resume it: tuneloop train -c CONFIG --resume")
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return _from_folder(folder.resolve(), ref, label or folder.name, config, workspace)
    registered = _from_registry(ref, config, workspace, label)
    if registered is not None:
        return registered
    raise TuneloopError(
        f"--model {ref!r} is not `base`, a registry reference, a run id in {workspace.runs}, or a model/adapter folder",
        hint="see `tuneloop registry list` and " + str(workspace.runs),
    )


def _from_registry(ref: str, config: LoopConfig, workspace: Workspace, label: str | None) -> ModelSpec | None:
    """`NAME@alias`, `NAME/3` or `NAME`: the registry is the only place that turns a name into files."""
    from tuneloop.registry.store import REFERENCE, Registry

    if not REFERENCE.match(ref):
        return None
    registry = Registry(config, workspace)
    name = REFERENCE.match(ref)["name"]  # type: ignore[index]
    if name not in registry.names():
        return None
    info = registry.get(ref)
    spec = _from_folder(Path(info.artifact_path), ref, label or "tuned", config, workspace)
    run_dir = workspace.run_dir(info.run_id) if info.run_id else None
    return ModelSpec(
        spec.ref,
        spec.label,
        spec.base_folder,
        spec.adapter,
        spec.full_model,
        run_dir if run_dir and run_dir.exists() else None,
    )


def _from_folder(folder: Path, ref: str, label: str, config: LoopConfig, workspace: Workspace) -> ModelSpec:
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        base_path = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        base_folder = Path(base_path) if base_path and Path(base_path).is_dir() else None
        if base_folder is None:
            base_folder = materialize(resolve_base(config.base_model_spec(), workspace))
        return ModelSpec(ref, label, base_folder, adapter=folder)
    if (folder / "config.json").exists():
        return ModelSpec(ref, label, folder, full_model=folder)
    raise TuneloopError(f"{folder} holds neither a PEFT adapter nor a Hugging Face model")


def latest_finished_run(workspace: Workspace) -> str | None:
    finished = [path.parent for path in workspace.runs.glob("*/summary.json")]
    if not finished:
        return None
    return max(finished, key=lambda path: path.stat().st_mtime).name
