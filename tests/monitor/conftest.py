"""A served loop for the monitoring tests: `tuneloop run` on the tiny model (registered, promoted champion), then
a real gateway on 127.0.0.1 with an A/B route (champion 70 / base 30), some traffic and some ratings."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.serve.servers import start_serve, wait_ready
from tuneloop.cli import app


@dataclass
class ServedLoop:
    url: str
    workspace: Path
    run_id: str
    version: int


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make system-deps` (Debian's {name} package; `make test` does it)")
    return path


@pytest.fixture(scope="module")
def served_loop(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServedLoop]:
    root = tmp_path_factory.mktemp("served-loop")
    rows = [{"instruction": f"Repeat the number {i}", "output": f"number {i} is {i}"} for i in range(60)]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "project": {"name": "monitor"},
        "model": {"base": str(tiny_model_dir)},
        "data": {
            "sources": [{"path": str(root / "rows.jsonl")}],
            "max_seq_len": 128,
            "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
        },
        "train": {
            "max_steps": 6,
            "batch_size": 2,
            "learning_rate": 0.01,
            "eval_every": 2,
            "logging_every": 1,
            "save_every": 2,
            "lora": {"r": 8, "alpha": 16},
        },
        "eval": {"metrics": ["perplexity"], "gates": {"perplexity_max": 1e9}, "limit": 4},
        "registry": {"name": "tiny-loop"},
        "serve": {
            "engine": "transformers",
            "precision": "fp32",
            "routes": {"tiny": {"variants": {"tiny-loop@champion": 70, str(tiny_model_dir): 30}}},
        },
    }
    config_path = root / "loop.yaml"
    config_path.write_text(yaml.safe_dump(config))
    workspace = root / "ws"
    result = CliRunner().invoke(app, ["run", "-c", str(config_path), "--workspace", str(workspace), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    process, url = start_serve(config_path, workspace)
    try:
        wait_ready(url, process)
        for user in range(12):
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "tiny",
                    "user": f"user-{user}",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"hello {user}"}],
                },
                timeout=60,
            ).json()
            rating = "up" if user % 3 else "down"
            httpx.post(f"{url}/v1/feedback", json={"response_id": answer["id"], "rating": rating}, timeout=10)
        yield ServedLoop(url, workspace, summary["run_id"], summary["registry"]["version"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
