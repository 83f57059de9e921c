"""`tuneloop bench serve` against a real gateway process (in-process engine, tiny model) on 127.0.0.1: several users
values in one run, a shared system prompt, and batch mode over /v1/batch and the Files + Batches API."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.serve.servers import start_serve, wait_ready
from tuneloop.cli import app
from tuneloop.serve.bench import shared_system_prompt

API_KEY = "bench-key"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("bench")
    config = root / "config.yaml"
    config.write_text(
        f"model: {{base: {tiny_model_dir}}}\n"
        f"serve: {{engine: transformers, api_keys: [{API_KEY}], precision: fp32, max_batch_size: 8}}\n"
    )
    process, url = start_serve(config, root / "ws")
    wait_ready(url, process)
    yield {"url": url, "model": str(tiny_model_dir)}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def bench(gateway: dict[str, str], *options: str) -> Any:
    arguments = ["bench", "serve", "--url", gateway["url"], "--model", gateway["model"], "--api-key", API_KEY]
    result = CliRunner().invoke(app, [*arguments, "--max-tokens", "4", *options], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def test_a_row_per_users_value_without_errors(gateway: dict[str, str]) -> None:
    report = json.loads(bench(gateway, "--users", "1,4", "--users", "6", "--requests", "8", "--json").stdout)
    assert [run["users"] for run in report["runs"]] == [1, 4, 6]
    for run in report["runs"]:
        assert run["mode"] == "stream" and run["requests"] == 8 and run["errors"] == 0, run
        assert run["output_tokens_per_second"] > 0 and 0 < run["ttft_p50_s"] <= run["ttft_p95_s"]
    assert "ttft_p50_s" not in report  # several runs: no single run's fields at the top
    assert "avx" in report["cpu"].lower() or "(" in report["cpu"]  # the CPU model and its ISA features

    table = bench(gateway, "--users", "2,3", "--requests", "4").stdout
    assert "CPU:" in table and "TTFT p50" in table
    rows = [line.split("│") for line in table.splitlines() if line.startswith("│")]
    assert [row[1].strip() for row in rows] == ["2", "3"]  # one row per users value


def test_shared_system_prompt_goes_in_front_of_every_request(gateway: dict[str, str]) -> None:
    plain = json.loads(bench(gateway, "--users", "2", "--requests", "4", "--json").stdout)
    shared = json.loads(
        bench(gateway, "--users", "2", "--requests", "4", "--system-prompt-tokens", "60", "--json").stdout
    )
    assert shared["errors"] == plain["errors"] == 0
    # The same prompts, each behind the same system prompt: every request is longer by the same amount.
    assert shared["mean_prompt_tokens"] - plain["mean_prompt_tokens"] >= 40
    assert shared_system_prompt(60) == shared_system_prompt(60) and len(shared_system_prompt(600).split()) > 400


def test_batch_mode_reports_requests_per_second_of_both_batch_paths(gateway: dict[str, str]) -> None:
    report = json.loads(
        bench(gateway, "--mode", "batch", "--users", "2", "--requests", "12", "--batch-size", "4", "--json").stdout
    )
    synchronous, api = report["runs"]
    assert synchronous["mode"] == "batch" and synchronous["calls"] == 3 and synchronous["users"] == 2
    assert api["mode"] == "batches-api" and api["status"] == "completed"
    assert api["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    for run in (synchronous, api):
        assert (run["completed"], run["failed"]) == (12, 0), run
        assert run["requests_per_second"] > 0 and run["output_tokens"] > 0
    table = bench(gateway, "--mode", "batch", "--users", "1", "--requests", "4", "--batch-size", "2").stdout
    assert "/v1/batch" in table and "Files + Batches API" in table and "CPU:" in table


def test_failures_are_counted_not_hidden(gateway: dict[str, str]) -> None:
    arguments = ["bench", "serve", "--url", gateway["url"], "--model", gateway["model"], "--requests", "3", "--json"]
    unauthorised = CliRunner().invoke(app, [*arguments, "--mode", "batch", "--batch-size", "2"])  # no --api-key
    runs = json.loads(unauthorised.stdout)["runs"]
    assert [(run["completed"], run["failed"]) for run in runs] == [(0, 3), (0, 3)]
    assert all("HTTP 401" in run["error_samples"][0] for run in runs)
    wrong_model = json.loads(
        bench(
            gateway, "--mode", "batch", "--users", "1", "--requests", "3", "--json", "--model", "no-such-model"
        ).stdout
    )
    assert [(run["completed"], run["failed"]) for run in wrong_model["runs"]] == [(0, 3), (0, 3)]
    refused = CliRunner().invoke(app, [*arguments, "--users", "0,8"])
    assert refused.exit_code != 0 and "--users" in refused.output
