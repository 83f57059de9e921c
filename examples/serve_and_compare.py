"""The end of `make demo`: serve the champion of the quickstart for a moment, send the same chat request for the
base model and the tuned one through the gateway (the official openai client), and print both answers side by
side with the expected one.

    .venv/bin/python examples/serve_and_compare.py -c examples/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from tuneloop.config_file import load_config
from tuneloop.net import free_port, wait_until_ready
from tuneloop.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--engine", default="transformers", help="serving engine (default: in-process, starts fast)")
    args = parser.parse_args()
    console = Console()
    config = load_config(args.config, [])
    champion = f"{config.registry.name}@champion"
    question, expected = _validation_example(Workspace.from_env(None))

    port = free_port()
    log_path = Workspace.from_env(None).serve.log("demo-gateway")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneloop.cli",
            "serve",
            "-c",
            str(args.config),
            "--model",
            champion,
            "--engine",
            args.engine,
            "--port",
            str(port),
        ],
        env=os.environ.copy(),
        stdout=log_path.open("ab"),  # the gateway's request log, kept out of the comparison
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with console.status(f"starting the gateway with {champion}"):
            outcome = wait_until_ready(url, server, 300)
        if outcome != "ready":
            sys.exit(f"the gateway {outcome} (exit status {server.poll()}); see {log_path}")
        client = OpenAI(base_url=f"{url}/v1", api_key="demo")
        answers = {}
        for label, model in (("base", config.model.base), ("tuned", champion)):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0
            )
            answers[label] = reply.choices[0].message.content.strip()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    table = Table(title=f"one request through the gateway ({url}/v1/chat/completions)", show_lines=True)
    table.add_column("", style="bold")
    table.add_column("answer", overflow="fold")
    table.add_column("exact match")
    table.add_row("prompt", question, "")
    table.add_row("expected", expected, "")
    for label, answer in answers.items():
        table.add_row(
            f"{label} ({config.model.base if label == 'base' else champion})",
            answer,
            "[green]yes[/]" if answer == expected else "[red]no[/]",
        )
    console.print(table)
    console.print(
        f"serve it yourself: tuneloop serve -c {args.config} --model {champion}  "
        "(then http://127.0.0.1:8000/dashboard, /metrics, /v1/chat/completions)"
    )


def _validation_example(workspace: Workspace) -> tuple[str, str]:
    """A held-out row of the newest prepared dataset: the user message and the expected answer."""
    prepared = [workspace.dataset(path.name) for path in workspace.datasets.glob("ds-*")]
    prepared = sorted((d for d in prepared if d.manifest.exists()), key=lambda d: d.manifest.stat().st_mtime)
    if not prepared:
        sys.exit("no prepared dataset: run `tuneloop run -c examples/quickstart.yaml` first")
    with prepared[-1].conversations("val").open(encoding="utf-8") as handle:
        row = json.loads(handle.readline())
    messages = row["messages"]
    return messages[-2]["content"], messages[-1]["content"]


if __name__ == "__main__":
    main()
