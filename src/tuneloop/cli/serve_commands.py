"""`tuneloop serve` and `tuneloop bench serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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


@bench_app.command("serve")
@handles_errors
def bench_serve_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of an OpenAI-compatible server.")],
    model: Annotated[str, typer.Option("--model", help="The model name to request.")],
    users: Annotated[int, typer.Option("--users", help="Concurrent simulated users (at most 100).")] = 8,
    requests: Annotated[int, typer.Option("--requests", help="Total requests to send.")] = 64,
    duration: Annotated[float | None, typer.Option("--duration", help="Stop after this many seconds.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens per request.")] = 64,
    data: Annotated[Path | None, typer.Option("--data", help="JSONL with a `prompt` or `instruction` field.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TUNELOOP_API_KEY")] = None,
    as_json: JsonOption = False,
) -> None:
    """Load-test an endpoint: TTFT / inter-token / end-to-end latency percentiles, tokens/s, requests/s, errors."""
    from tuneloop.serve.bench import bench_serve, default_prompts

    if not 1 <= users <= 100:
        raise TuneloopError("--users must be between 1 and 100")
    prompts = default_prompts()
    if data is not None:
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [str(row.get("prompt") or row.get("instruction") or "") for row in rows if isinstance(row, dict)]
        prompts = [prompt for prompt in prompts if prompt] or default_prompts()
    result = bench_serve(url, model, prompts, users, requests, duration, max_tokens, api_key)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"{result['requests']} requests, {users} users, {model}")
    table.add_column("metric")
    for column in ("p50", "p95", "p99"):
        table.add_column(column, justify="right")
    for name, label in (
        ("ttft", "time to first token (s)"),
        ("itl", "inter-token latency (s)"),
        ("e2e", "end-to-end latency (s)"),
    ):
        table.add_row(label, *[fmt(result[f"{name}_p{p}_s"]) for p in (50, 95, 99)])
    stdout.print(table)
    stdout.print(
        f"output tokens/s {result['output_tokens_per_second']:.1f}, requests/s "
        f"{result['requests_per_second']:.2f}, errors {result['errors']}"
    )
