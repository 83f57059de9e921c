"""`tuneloop train` (single run, resume, sweeps, multi-process)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import (
    ConfigOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    fmt,
    handles_errors,
    quiet_libraries,
    stderr,
    stdout,
)
from tuneloop.errors import TuneloopError


@app.command("train")
@handles_errors
def train(
    config_file: ConfigOption,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest unfinished run of this config.")
    ] = False,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Use (or resume) this run id.")] = None,
    sweep: Annotated[int, typer.Option("--sweep", help="Run N Optuna trials over train.sweep.space.")] = 0,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes on this node (torchrun --nproc-per-node).")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes in the job.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank, 0..nnodes-1.")] = 0,
    master_addr: Annotated[
        str, typer.Option("--master-addr", help="Address of node 0, where the nodes meet.")
    ] = "127.0.0.1",
    master_port: Annotated[
        int | None, typer.Option("--master-port", help="Port on node 0 (default: a free one, single node only).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option("--rdzv-endpoint", help="HOST:PORT for c10d rendezvous (elastic; replaces the three above)."),
    ] = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", help="Restart the workers this many times after a failure.")
    ] = 0,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the strategy, per-rank memory and launch commands; do not train.")
    ] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune the base model (LoRA, QLoRA or full) on the prepared data; prepares the data first if needed."""
    quiet_libraries()
    from tuneloop.config_file import load_config
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    space = Workspace.from_env(workspace)
    if sweep and (plan or nproc > 1 or nnodes > 1):
        raise TuneloopError(
            "--sweep runs its trials one process at a time; it does not combine with --plan, --nproc or --nnodes",
            hint="sweep on one process, then train the best trial's settings with --nproc/--nnodes",
        )
    if sweep:
        from tuneloop.train.sweep import run_sweep

        outcome = run_sweep(config, space, sweep, console=stderr)
        if as_json:
            emit_json(outcome)
        else:
            _print_sweep(outcome)
        return
    from tuneloop.train.launch import Topology

    topology = Topology(nproc, nnodes, node_rank, master_addr, master_port, rdzv_endpoint, max_restarts)
    if plan:
        from tuneloop.train.plan import plan_training

        topology.check()
        outcome = plan_training(config, space, topology, config_file, overrides or [])
        if as_json:
            emit_json(outcome)
        else:
            _print_plan(outcome)
        return
    if topology.world_size > 1:
        from tuneloop.train.launch import launch_distributed

        result = launch_distributed(config_file, overrides or [], space, topology, resume, run_id, stderr)
        if result is None:  # node 0 holds global rank 0 and writes the result (with c10d, torchrun picks ranks)
            this_node = None if rdzv_endpoint else node_rank
            stderr.print(
                f"this node{'' if this_node is None else f' ({this_node})'} finished its share; "
                "the run's result is written by the node holding rank 0"
            )
            if as_json:
                emit_json({"node_rank": this_node, "finished": True})
            return
    else:
        from tuneloop.train.recipe import describe_failure, train_model

        try:
            result = train_model(config, space, resume=resume, run_id=run_id, console=stderr)
        except (TuneloopError, KeyboardInterrupt):
            raise
        except Exception as error:  # a crash mid-run: the checkpoints stay, say how to resume
            raise describe_failure(error) from error
    summary = result.summary()
    if config.registry.name:
        from tuneloop.registry.store import Registry
        from tuneloop.registry.versions import ensure_registered

        info, _ = ensure_registered(Registry(config, space), config.registry.name, result.run_id)
        summary["registry"] = {"name": info.name, "version": info.version, "aliases": info.aliases}
    if as_json:
        emit_json(summary)
        return
    _print_train_summary(summary)


def _print_train_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run_id']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("method", summary["method"] + (f" ({summary['quantization']})" if summary["quantization"] else "")),
        ("precision", summary["precision"]),
        ("steps", str(summary["steps"])),
        ("tokens", f"{summary['tokens']:,}"),
        ("tokens/s (training time)", f"{summary['tokens_per_second']:,.1f}"),
        (
            "first step" + (" (compiles)" if summary.get("compiled") else ""),
            f"{summary.get('first_step_seconds', 0.0):,.1f} s",
        ),
        ("train loss (last)", fmt(summary["train_loss"])),
        ("eval loss", fmt(summary["eval_loss"])),
        (
            "kept checkpoint",
            f"step {summary['best_step']} ({summary['metric_for_best']} {fmt(summary['best_metric'])})"
            if summary.get("best_step")
            else "the last",
        ),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB (estimated {summary['memory_estimate_mb']:,} MiB)"),
        ("base weights in memory", f"{summary['model_memory_mb']:,.0f} MiB"),
        ("wall time", f"{summary['wall_seconds']:,.1f} s"),
        ("adapter" if summary["adapter_path"] else "model", summary["adapter_path"] or summary["model_path"]),
        ("mlflow run", summary["mlflow_run_id"] or "-"),
    ]
    if summary.get("registry"):
        rows.append(("registered as", f"{summary['registry']['name']}/{summary['registry']['version']}"))
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)


def _print_plan(outcome: dict[str, Any]) -> None:
    memory = outcome["per_rank_mb"]
    table = Table(title=f"plan: {outcome['strategy']} over {outcome['world_size']} processes", show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("method / precision", f"{outcome['method']} / {outcome['precision']}"),
        ("nodes x processes", f"{outcome['nodes']} x {outcome['processes_per_node']}"),
        ("weights per rank", f"{memory['weights']:,} MiB"),
        ("optimizer + gradients per rank", f"{memory['optimizer_and_gradients']:,} MiB"),
        ("activations per rank", f"{memory['activations']:,} MiB"),
        ("total per rank", f"{memory['total']:,} MiB"),
        ("offloaded to host per rank", f"{memory['offloaded_to_host']:,} MiB"),
        (
            f"available per rank here ({outcome['device']})",
            f"{outcome['available_here_per_rank_mb']:,} MiB: " + ("fits" if outcome["fits_here"] else "does NOT fit"),
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    stdout.print(table)
    for note in outcome["notes"]:
        stdout.print(f"[yellow]note:[/] {note}")
    if outcome["problem"]:
        stdout.print(f"[red]on this machine:[/] {outcome['problem']}")
    stdout.print("launch (one line per node):")
    for command in outcome["commands"]:
        stdout.print(f"  {command}", highlight=False, soft_wrap=True)


def _print_sweep(outcome: dict[str, Any]) -> None:
    table = Table(title=f"sweep {outcome['study']} ({len(outcome['trials'])} trials)")
    for column in ("trial", "state", "eval_loss", "params", "run"):
        table.add_column(column)
    for trial in outcome["trials"]:
        marker = " [bold green](best)[/]" if trial["number"] == outcome["best_trial"] else ""
        table.add_row(
            str(trial["number"]) + marker,
            trial["state"],
            fmt(trial["value"]),
            json.dumps(trial["params"]),
            trial.get("run_id") or "-",
        )
    stdout.print(table)
