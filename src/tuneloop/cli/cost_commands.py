"""`tuneloop cost`: $ per training run and per 1M generated tokens from measured numbers and a price table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tuneloop.cli import app
from tuneloop.cli.common import (
    ConfigOptionalOption,
    JsonOption,
    SetOption,
    WorkspaceOption,
    emit_json,
    handles_errors,
    stdout,
)
from tuneloop.errors import TuneloopError


@app.command("cost")
@handles_errors
def cost(
    run: Annotated[
        str | None, typer.Option("--run", help="Training run id or registry reference (default: the newest run).")
    ] = None,
    bench: Annotated[
        Path | None, typer.Option("--bench", help="`tuneloop bench serve --json` output: serving tokens/s.")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="A live gateway: serving tokens/s from its /metrics over --window s.")
    ] = None,
    window: Annotated[float, typer.Option("--window", help="Seconds between the two /metrics samples.")] = 10.0,
    serving_tps: Annotated[
        float | None, typer.Option("--serving-tps", help="Serving output tokens/s, measured elsewhere.")
    ] = None,
    prices: Annotated[
        Path | None, typer.Option("--prices", help="Price table YAML (default: tuneloop's cost/prices.yaml).")
    ] = None,
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """$ per training run and $ per 1M generated tokens per price-table entry, beside API prices; writes the cost
    section (cost.md) into the run's folder."""
    from tuneloop.cost.estimate import Measured, cost_markdown, estimate_costs, load_prices
    from tuneloop.workspace import Workspace

    space = Workspace.from_env(workspace)
    measured = Measured()
    run_dir = _run_dir(run, config_file, overrides, space)
    if run_dir is not None:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        measured.run_id = summary["run_id"]
        measured.training_tokens = summary["tokens"]
        measured.training_tokens_per_second = summary["tokens_per_second"]
        measured.training_wall_seconds = summary["wall_seconds"]
    if bench is not None:
        measured.serving_tokens_per_second = float(json.loads(bench.read_text())["output_tokens_per_second"])
        measured.serving_source = f"bench {bench}"
    elif url is not None:
        from tuneloop.monitor.scrape import generation_rate

        measured.serving_tokens_per_second = generation_rate(url, window)
        measured.serving_source = f"live {url} over {window:g} s"
    elif serving_tps is not None:
        measured.serving_tokens_per_second, measured.serving_source = serving_tps, "--serving-tps"
    result = estimate_costs(load_prices(prices), measured)
    if run_dir is not None:
        (run_dir / "cost.md").write_text(cost_markdown(result), encoding="utf-8")
        result["report"] = str(run_dir / "cost.md")
    if as_json:
        emit_json(result)
        return
    _print_costs(result)


def _run_dir(run: str | None, config_file: Path | None, overrides: list[str] | None, space: Any) -> Path | None:
    if run is None:
        from tuneloop.evaluate.refs import latest_finished_run

        run = latest_finished_run(space)
        if run is None:
            return None
    if (space.run_dir(run) / "summary.json").exists():
        return space.run_dir(run)
    from tuneloop.config import LoopConfig
    from tuneloop.config_file import load_config
    from tuneloop.registry.store import Registry

    config = load_config(config_file, overrides) if config_file else LoopConfig()
    info = Registry(config, space).get(run)
    if info.run_id is None or not (space.run_dir(info.run_id) / "summary.json").exists():
        raise TuneloopError(f"{run} has no training run in this workspace", hint="pass --run RUN_ID")
    return space.run_dir(info.run_id)


def _print_costs(result: dict[str, Any]) -> None:
    measured = result["measured"]
    table = Table(title="cost per price-table entry")
    for column in ("compute", "$/hour", "serving tok/s", "basis", "$ / 1M tokens", "$ / training run"):
        text = column in ("compute", "basis")
        table.add_column(column, justify="left" if text else "right", no_wrap=column == "compute")
    for row in result["compute"]:
        table.add_row(
            row["name"],
            f"{row['usd_per_hour']:.4f}",
            "-" if row["serving_tokens_per_second"] is None else f"{row['serving_tokens_per_second']:,.1f}",
            row["serving_basis"],
            "-" if row["usd_per_million_tokens"] is None else f"{row['usd_per_million_tokens']:,.4f}",
            "-" if row["usd_per_training_run"] is None else f"{row['usd_per_training_run']:,.6f}",
        )
    stdout.print(table)
    api = Table(title="API prices for comparison")
    api.add_column("API")
    api.add_column("$ / 1M output tokens", justify="right")
    for name, value in result["api"].items():
        api.add_row(name, f"{value['usd_per_million_output_tokens']:.2f}")
    stdout.print(api)
    stdout.print(
        f"measured: run {measured['run_id'] or '-'}, serving {measured['serving_tokens_per_second'] or '-'} tokens/s "
        f"({measured['serving_source'] or 'pass --bench, --url or --serving-tps'})"
    )
    if result.get("report"):
        stdout.print(f"report section: {result['report']}")
