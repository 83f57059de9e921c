"""`tuneloop cost`: gather what was measured (a training run, a serving throughput), price it, and write the run's
cost section (cost.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.artifacts.training import TrainResult
from tuneloop.config import LoopConfig
from tuneloop.cost.estimate import Measured, Platform, cost_markdown, estimate_costs, load_prices
from tuneloop.errors import TuneloopError
from tuneloop.workspace import RunPaths, Workspace


def cost_for_run(
    run: str | None,
    config: LoopConfig,
    workspace: Workspace,
    *,
    bench: Path | None = None,
    url: str | None = None,
    window: float = 10.0,
    serving_tps: float | None = None,
    prices: Path | None = None,
    platform: Platform | None = None,
) -> dict[str, Any]:
    """$ per training run and per 1M generated tokens for each price-table entry. `run` is a run id or registry
    reference (default: the newest finished run); serving tokens/s come from a `bench serve --json` file, a live
    gateway's /metrics sampled over `window` seconds, or a figure measured elsewhere. `platform` lists only that
    platform's entries, and prices those without a throughput of their own at `serving_tps` (stated for its GPUs)."""
    measured = Measured()
    paths = _run_paths(run, config, workspace)
    if paths is not None:
        result = TrainResult.load(paths.summary)
        measured.run_id = result.run_id
        measured.training_tokens = result.tokens
        measured.training_tokens_per_second = result.tokens_per_second
        measured.training_wall_seconds = result.wall_seconds
        measured.training_nodes = result.nodes
    if bench is not None:
        measured.serving_tokens_per_second = float(json.loads(bench.read_text())["output_tokens_per_second"])
        measured.serving_source = f"bench {bench}"
    elif url is not None:
        from tuneloop.monitor.scrape import generation_rate

        measured.serving_tokens_per_second = generation_rate(url, window)
        measured.serving_source = f"live {url} over {window:g} s"
    elif serving_tps is not None:
        measured.serving_tokens_per_second, measured.serving_source = serving_tps, "--serving-tps"
    costs = estimate_costs(load_prices(prices), measured, platform, stated_tps=serving_tps)
    if paths is not None:
        paths.cost.write_text(cost_markdown(costs), encoding="utf-8")
        costs["report"] = str(paths.cost)
    return costs


def _run_paths(run: str | None, config: LoopConfig, workspace: Workspace) -> RunPaths | None:
    run = run or workspace.latest_finished_run()
    if run is None:
        return None
    if workspace.run(run).summary.exists():
        return workspace.run(run)
    from tuneloop.registry.refs import resolve_model_ref

    spec = resolve_model_ref(run, config, workspace)
    if spec.run is None or not spec.run.summary.exists():
        raise TuneloopError(f"{run} has no training run in this workspace", hint="pass --run RUN_ID")
    return spec.run
