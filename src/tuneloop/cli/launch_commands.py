"""`tuneloop launch kubeflow|skypilot|slurm`: write a cluster job spec (and a README on submitting it) that runs
`tuneloop train` on every node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import ConfigOption, JsonOption, SetOption, emit_json, handles_errors, stdout

# The same choices as tuneloop.cluster.LaunchTarget, spelled here so that `tuneloop --help` does not import the
# launchers (tests/cluster checks the two agree).
LaunchTargetChoice = Literal["kubeflow", "skypilot", "slurm"]


@app.command("launch")
@handles_errors
def launch(
    target: Annotated[
        LaunchTargetChoice,
        typer.Argument(help="Scheduler: kubeflow (a TrainJob), skypilot (a task YAML) or slurm (an sbatch script)."),
    ],
    config_file: ConfigOption,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes (machines) the job runs on.")],
    gpus_per_node: Annotated[
        int, typer.Option("--gpus-per-node", help="GPUs per node, one training process each; 0 for CPU nodes.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the spec, the config copy and README.md into.")],
    overrides: SetOption = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image", help="Container image with tuneloop and torch (required by kubeflow; skypilot: optional)."
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="Run id for every node (default: the scheduler's job id or TrainJob name)."),
    ] = None,
    gpu_type: Annotated[
        str | None,
        typer.Option("--gpu-type", help="GPU model: required by skypilot (H100, A100-80GB...), optional for slurm."),
    ] = None,
    cpu_procs_per_node: Annotated[
        int | None,
        typer.Option("--cpu-procs-per-node", help="CPU nodes (--gpus-per-node 0): training processes per node [1]."),
    ] = None,
    cpus_per_node: Annotated[
        int | None, typer.Option("--cpus-per-node", help="CPU cores per node [8 per GPU; 4 per CPU process].")
    ] = None,
    memory_gb_per_node: Annotated[
        int | None,
        typer.Option("--memory-gb-per-node", help="Host memory per node in GB [32 per GPU; 8 per CPU process]."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty --out (replacing these files).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a job spec that starts `tuneloop train` on every node of a Kubeflow, SkyPilot or Slurm cluster, with a
    README saying how to submit it. The config is validated first; nothing is submitted."""
    from tuneloop.cluster import NodeRequest, write_launch

    request = NodeRequest(
        nnodes=nnodes,
        gpus_per_node=gpus_per_node,
        cpu_procs_per_node=cpu_procs_per_node,
        cpus_per_node=cpus_per_node,
        memory_gb_per_node=memory_gb_per_node,
        gpu_type=gpu_type,
        image=image,
        run_id=run_id,
    )
    result = write_launch(target, config_file, request, out, overrides=overrides, force=force)
    if as_json:
        emit_json(result.summary())
        return
    table = Table(title=f"{target} job {result.name}: {out}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("files", ", ".join(result.files))
    table.add_row("submit", "\n".join(result.submit))
    table.add_row("each node runs", result.summary()["node_command_line"])
    stdout.print(table)
    stdout.print(f"see {out / 'README.md'} for where the data must be and what each part does")
