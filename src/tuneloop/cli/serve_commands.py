"""`tuneloop serve` and `tuneloop bench serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from tuneloop.cli import app, bench_app
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
from tuneloop.config import EngineName
from tuneloop.errors import TuneloopError


@app.command("serve")
@handles_errors
def serve(
    config_file: ConfigOption,
    models: Annotated[
        list[str] | None, typer.Option("--model", help="A model to serve (repeatable): NAME@alias, run id, folder.")
    ] = None,
    engine: Annotated[EngineName | None, typer.Option("--engine", help="The engine (default: serve.engine).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    overrides: SetOption = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the OpenAI-compatible gateway in the foreground until SIGTERM/SIGINT, then drain and exit 0."""
    quiet_libraries()
    import logging

    from tuneloop.config_file import load_config
    from tuneloop.serve.launch import build_gateway, run_until_signalled
    from tuneloop.workspace import Workspace

    config = load_config(config_file, overrides)
    gateway = build_gateway(config, Workspace.from_env(workspace), models, engine, host, port)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [model.name for model in gateway.engine.models()]
    if as_json:
        emit_json({"url": gateway.url, "engine": gateway.engine.name, "models": names})
    else:
        stderr.print(f"serving {', '.join(names)} with the {gateway.engine.name} engine on {gateway.url}")
    run_until_signalled(gateway)


BenchMode = Literal["stream", "batch"]


@bench_app.command("serve")
@handles_errors
def bench_serve_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of an OpenAI-compatible server.")],
    model: Annotated[str, typer.Option("--model", help="The model name to request.")],
    users: Annotated[
        list[str] | None,
        typer.Option(
            "--users",
            help="Concurrent simulated users, 1-100: one run per value, e.g. --users 1,8,32,64,100 (or repeat the "
            "option). Batch mode: /v1/batch calls in flight. Default 8.",
        ),
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option("--requests", help="Requests per run (default: stream max(64, 2 x users); batch 128)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop a streaming run after this many s.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens per request.")] = 64,
    data: Annotated[Path | None, typer.Option("--data", help="JSONL with a `prompt` or `instruction` field.")] = None,
    system_prompt_tokens: Annotated[
        int,
        typer.Option(
            "--system-prompt-tokens",
            min=0,
            help="Put the same system prompt of about N tokens in front of every request: the shared-prefix workload "
            "where prefix caching should win (0: none).",
        ),
    ] = 0,
    mode: Annotated[
        BenchMode,
        typer.Option(
            "--mode",
            help="stream: streamed chat requests (latency, tokens/s). batch: requests/s of /v1/batch and of the "
            "Files + Batches API.",
        ),
    ] = "stream",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=256, help="Batch mode: requests per /v1/batch call.")
    ] = 16,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TUNELOOP_API_KEY")] = None,
    as_json: JsonOption = False,
) -> None:
    """Load-test an endpoint: TTFT / inter-token / end-to-end latency percentiles, tokens/s, requests/s, errors, per
    users value; or (--mode batch) the requests/s of batch inference. Prints the CPU it ran on."""
    from tuneloop.serve.bench import (
        bench_batch_modes,
        bench_serve_users,
        default_prompts,
        report,
        shared_system_prompt,
    )

    counts = _users_values(users or ["8"])
    prompts = default_prompts()
    if data is not None:
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [str(row.get("prompt") or row.get("instruction") or "") for row in rows if isinstance(row, dict)]
        prompts = [prompt for prompt in prompts if prompt] or default_prompts()
    system_prompt = shared_system_prompt(system_prompt_tokens) if system_prompt_tokens else None
    if mode == "batch":
        runs = bench_batch_modes(
            url, model, prompts, counts, requests or 128, batch_size, max_tokens, api_key, system_prompt
        )
    else:
        runs = bench_serve_users(
            url, model, prompts, counts, requests, duration, max_tokens, api_key, system_prompt=system_prompt
        )
    result = report(runs)
    if as_json:
        emit_json(result)
        return
    stdout.print(f"CPU: {result['cpu']}")
    stdout.print(_batch_table(runs, model) if mode == "batch" else _stream_table(runs, model))
    for run in runs:
        for sample in run.get("error_samples") or []:
            stderr.print(f"[yellow]error ({run['mode']}, users {run['users']}):[/] {sample}")


def _users_values(values: list[str]) -> list[int]:
    """`--users 1,8,32` and `--users 1 --users 8`: the users values, each 1-100."""
    counts: list[int] = []
    for value in values:
        for part in value.replace(",", " ").split():
            if not part.isdigit() or not 1 <= int(part) <= 100:
                raise TuneloopError(f"--users {part!r}: each value must be a whole number from 1 to 100")
            counts.append(int(part))
    if not counts:
        raise TuneloopError("--users needs at least one value, e.g. --users 1,8,32")
    return counts


def _stream_table(runs: list[dict[str, Any]], model: str) -> Table:
    table = Table(title=f"streamed chat requests to {model} (latencies in s)")
    columns = ["users", "requests", "errors", "out tok/s", "req/s", "TTFT p50", "TTFT p95", "TTFT p99"]
    for column in [*columns, "ITL p50", "e2e p50", "e2e p95"]:
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(
            str(run["users"]),
            str(run["requests"]),
            str(run["errors"]),
            f"{run['output_tokens_per_second']:.1f}",
            f"{run['requests_per_second']:.2f}",
            *[fmt(run[key]) for key in ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s")],
            fmt(run["e2e_p95_s"]),
        )
    return table


def _batch_table(runs: list[dict[str, Any]], model: str) -> Table:
    table = Table(title=f"batch inference with {model}")
    columns = ["path", "calls in flight", "per call", "requests", "completed", "failed", "req/s", "output tok/s"]
    for column in [*columns, "wall s"]:
        table.add_column(column, justify="right")
    for run in runs:
        synchronous = run["mode"] == "batch"
        table.add_row(
            "/v1/batch" if synchronous else "Files + Batches API",
            str(run["users"]) if synchronous else "-",
            str(run["batch_size"]) if synchronous else "all",
            str(run["requests"]),
            str(run["completed"]),
            str(run["failed"]),
            f"{run['requests_per_second']:.2f}",
            f"{run['output_tokens_per_second']:.1f}",
            f"{run['wall_seconds']:.2f}",
        )
    return table
