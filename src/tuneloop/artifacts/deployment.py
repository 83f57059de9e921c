"""What `tuneloop deploy` wrote: deploy.json at the top of every deploy folder, read by the tests and by whoever
rolls the deployment forward (which version is inside, the engine command lines, the commands to run)."""

from __future__ import annotations

from tuneloop.artifacts._json import ArtifactPart, JsonArtifact


class DeployedModel(ArtifactPart):
    """The model inside a deploy folder: the registry version (or run, or folder) and what clients call it."""

    reference: str  # what the user passed: NAME@alias, NAME/VERSION, a run id or a folder
    registry_name: str | None = None
    version: int | None = None
    run_id: str | None = None
    base_model: str  # the served name of the base model (`model.base`)
    adapters: dict[str, str]  # served name -> folder under model/adapters/
    lora_rank: int  # the largest adapter rank (vLLM's --max-lora-rank)


class DeployManifest(JsonArtifact):
    target: str
    name: str  # the deployment's name on the platform (DNS-safe)
    model: DeployedModel
    model_root: str  # where the container sees model/ (/models, /mnt/models, /opt/ml/model ...)
    # Engine command lines as the container runs them: "gpu" (vLLM) and/or "cpu" (llama.cpp's llama-server).
    engine_commands: dict[str, list[str]]
    images: dict[str, str]  # role (gpu, cpu, gateway, worker) -> image reference
    files: list[str]  # every file written, relative to the folder
    commands: dict[str, str]  # step (build, push, deploy, call, rollback, scale ...) -> shell commands
