"""`tuneloop deploy TARGET REFERENCE`: a registry version as a self-contained folder for Docker, Kubernetes (+
KServe), Modal, RunPod or SageMaker, with a README saying how to build, push, deploy, call, roll and scale it.

Every target serves the version with the engine command line `tuneloop serve` runs locally (serve's
`vllm_arguments` / `llama_server_arguments`, with the folders as the container sees them) and carries the same
files (`deploy.bundle`): nothing is re-templated or re-converted on the way. Each target module has

    MODEL_ROOT   where its containers see the bundled `model/` folder
    NEEDS_GGUF   whether it serves on CPUs with llama.cpp (and so bundles GGUF files)
    write(ctx)   writes its files and README through `ctx.write`, returns a TargetOutput

and nothing else; `write_deployment` does the shared part and writes deploy.json (artifacts.DeployManifest).
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from tuneloop.artifacts.deployment import DeployManifest
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.workspace import Workspace

DeployTarget = Literal["docker", "kserve", "k8s", "modal", "runpod", "sagemaker"]
MANIFEST_NAME = "deploy.json"


@dataclass
class TargetOutput:
    engine_commands: dict[str, list[str]]  # "gpu" / "cpu" -> the engine's command line in the container
    images: dict[str, str]  # role -> image reference (empty where the platform builds its own)
    commands: dict[str, str]  # step -> shell commands, as the README gives them


def target_module(target: DeployTarget) -> ModuleType:
    modules = {
        "docker": "docker",
        "kserve": "kserve",
        "k8s": "kubernetes",
        "modal": "modal_app",
        "runpod": "runpod_worker",
        "sagemaker": "sagemaker",
    }
    return importlib.import_module(f"tuneloop.deploy.{modules[target]}")


def write_deployment(
    target: DeployTarget,
    reference: str,
    config: LoopConfig,
    workspace: Workspace,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> DeployManifest:
    """Write the deploy folder for `reference` on `target` into `out`; `overrides` are `deploy` keys (--gpu,
    --replicas ...) applied over the config's."""
    from tuneloop.deploy.bundle import bundle_model
    from tuneloop.deploy.context import MODEL_FOLDER, DeployContext

    module = target_module(target)
    settings = config.deploy.model_validate({**config.deploy.model_dump(), **(overrides or {})})
    if settings.min_replicas > settings.max_replicas:
        raise TuneloopError(
            f"deploy.min_replicas ({settings.min_replicas}) exceeds deploy.max_replicas ({settings.max_replicas})"
        )
    if out.exists() and any(out.iterdir()):
        if not force:
            raise TuneloopError(f"{out} is not empty", hint="pass --force to replace its contents, or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle_model(reference, config, workspace, out / MODEL_FOLDER, gguf=module.NEEDS_GGUF)
    context = DeployContext(config, settings, out, model)
    written: TargetOutput = module.write(context)
    manifest = DeployManifest(
        target=target,
        name=context.name,
        model=model,
        model_root=module.MODEL_ROOT,
        engine_commands=written.engine_commands,
        images=written.images,
        files=sorted([*context.files, MANIFEST_NAME]),
        commands=written.commands,
    )
    manifest.save(out / MANIFEST_NAME)
    return manifest
