"""`tuneloop deploy TARGET REFERENCE`: a registry version as a deploy folder for Docker, Kubernetes/KServe, Modal,
RunPod or SageMaker (files and a README with the commands; nothing is pushed or applied)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import ConfigOption, JsonOption, SetOption, WorkspaceOption, emit_json, handles_errors, stdout

# The same choices as tuneloop.deploy.DeployTarget, spelled here so that `tuneloop --help` does not import the
# targets (tests/deploy check the two agree).
DeployTargetChoice = Literal["docker", "kserve", "k8s", "modal", "runpod", "sagemaker"]


@app.command("deploy")
@handles_errors
def deploy(
    target: Annotated[
        DeployTargetChoice,
        typer.Argument(help="docker, kserve, k8s (Kustomize), modal, runpod or sagemaker."),
    ],
    reference: Annotated[
        str, typer.Argument(help="What to deploy: NAME@ALIAS, NAME/VERSION, a run id or an adapter folder.")
    ],
    config_file: ConfigOption,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the deployment into.")],
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU type (deploy.gpu), e.g. L4, A10G, H100.")] = None,
    replicas: Annotated[
        int | None, typer.Option("--replicas", help="Replicas to start with (deploy.replicas).")
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option("--min-replicas", help="Autoscaling floor, 0 to scale to zero (deploy.min_replicas).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max-replicas", help="Autoscaling ceiling (deploy.max_replicas).")
    ] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the contents of a non-empty --out.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a self-contained deploy folder for a registry version: the model files, the platform's artifacts
    (Dockerfile and compose, KServe/Kubernetes manifests, a Modal app, a RunPod worker, SageMaker SDK code) and a
    README with the exact commands to push, deploy, call, roll forward, roll back and scale."""
    from tuneloop.config_file import load_config
    from tuneloop.deploy import write_deployment
    from tuneloop.workspace import Workspace

    flags: dict[str, Any] = {
        "gpu": gpu,
        "replicas": replicas,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
    }
    manifest = write_deployment(
        target,
        reference,
        load_config(config_file, overrides),
        Workspace.from_env(workspace),
        out,
        overrides={key: value for key, value in flags.items() if value is not None},
        force=force,
    )
    if as_json:
        emit_json({**manifest.model_dump(mode="json"), "out": str(out)})
        return
    table = Table(title=f"{target} deployment {manifest.name}: {out}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("model", f"{manifest.model.reference} (served as {', '.join(manifest.model.adapters)})")
    table.add_row("files", ", ".join(file for file in manifest.files if not file.startswith("model/")))
    for step, commands in manifest.commands.items():
        table.add_row(step, commands)
    stdout.print(table)
    stdout.print(f"see {out / 'README.md'}")
