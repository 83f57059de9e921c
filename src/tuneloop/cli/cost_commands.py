"""`tuneloop cost`: $ per training run and per 1M generated tokens from measured numbers and a price table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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

# The same choices as tuneloop.cost.estimate.Platform (tests/cost check they agree), spelled here so that
# `tuneloop --help` imports no stage.
PlatformChoice = Literal["cpu", "k8s-gpu", "modal", "runpod", "sagemaker"]


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
    platform: Annotated[
        PlatformChoice | None,
        typer.Option(
            "--platform",
            help="Only this deploy platform's entries (cpu, k8s-gpu, modal, runpod, sagemaker); with --serving-tps, "
            "GPU entries are priced at that throughput.",
        ),
    ] = None,
    config_file: ConfigOptionalOption = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """$ per training run and $ per 1M generated tokens per price-table entry, beside API prices; writes the cost
    section (cost.md) into the run's folder."""
    from tuneloop.config_file import load_config
    from tuneloop.cost.report import cost_for_run
    from tuneloop.workspace import Workspace

    result = cost_for_run(
        run,
        load_config(config_file, overrides),
        Workspace.from_env(workspace),
        bench=bench,
        url=url,
        window=window,
        serving_tps=serving_tps,
        prices=prices,
        platform=platform,
    )
    if as_json:
        emit_json(result)
        return
    _print_costs(result)


def _print_costs(result: dict[str, Any]) -> None:
    measured = result["measured"]
    title = f"cost on {result['platform']}" if result.get("platform") else "cost per price-table entry"
    table = Table(title=title)
    for column in (
        "compute",
        "$/hour",
        "serving tok/s",
        "basis",
        "$ / 1M tokens",
        "x cheapest API",
        "$ / training run",
    ):
        text = column in ("compute", "basis")
        table.add_column(column, justify="left" if text else "right", no_wrap=column == "compute")
    for row in result["compute"]:
        table.add_row(
            row["name"],
            f"{row['usd_per_hour']:.4f}",
            "-" if row["serving_tokens_per_second"] is None else f"{row['serving_tokens_per_second']:,.1f}",
            row["serving_basis"],
            "-" if row["usd_per_million_tokens"] is None else f"{row['usd_per_million_tokens']:,.4f}",
            "-" if row["vs_cheapest_api"] is None else f"{row['vs_cheapest_api']:,.2f}",
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
