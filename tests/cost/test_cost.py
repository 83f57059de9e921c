"""`tuneloop cost`: the arithmetic per price-table entry, `measured` vs declared throughput, API comparison, JSON
interface and the report section. The run summary and bench result are written as `tuneloop train` and
`tuneloop bench serve --json` write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.cli import app
from tuneloop.workspace import Workspace

runner = CliRunner()


@pytest.fixture
def measured_workspace(tmp_path: Path) -> Path:
    run = Workspace(tmp_path / "ws").run("demo-run")
    RunRecord(run_id="demo-run", key="k", status="finished", dataset_id="ds-x", created_at="x").save(run.record)
    TrainResult(
        run_id="demo-run",
        run_dir=str(run.root),
        method="lora",
        adapter_path=str(run.adapter),
        model_path=None,
        base_model="smollm2-135m-instruct",
        base_weights_sha256="0" * 64,
        train_loss=1.0,
        eval_loss=1.0,
        steps=100,
        tokens=360_000,
        tokens_per_second=1000.0,
        peak_memory_mb=1000.0,
        wall_seconds=400.0,
        mlflow_run_id=None,
        dataset_id="ds-x",
        precision="fp32",
        quantization=None,
        resumed_from=None,
        memory_estimate_mb=1000.0,
        model_memory_mb=500.0,
    ).save(run.summary)
    return tmp_path / "ws"


def test_cost_per_entry_from_measured_numbers(measured_workspace: Path, tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        yaml.safe_dump(
            {
                "compute": {
                    "cpu": {
                        "usd_per_hour": 0.36,
                        "serving_tokens_per_second": "measured",
                        "training_tokens_per_second": "measured",
                    },
                    "gpu": {
                        "usd_per_second": 0.001,
                        "serving_tokens_per_second": 2000,
                        "training_tokens_per_second": 36000,
                    },
                    "unknown-gpu": {"usd_per_hour": 2.0},
                },
                "api": {"some-api": {"usd_per_million_output_tokens": 0.6}},
            }
        )
    )
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"output_tokens_per_second": 100.0}))
    result = runner.invoke(
        app,
        [
            "cost",
            "--run",
            "demo-run",
            "--bench",
            str(bench),
            "--prices",
            str(prices),
            "--workspace",
            str(measured_workspace),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    costs = json.loads(result.stdout)
    # cpu: $0.36/h at 100 tok/s = 360,000 tokens/h -> $1 per 1M; training 360k tokens at 1000 tok/s = 0.1 h -> $0.036
    assert costs["usd_per_million_tokens"] == {"cpu": 1.0, "gpu": 0.5, "unknown-gpu": None}
    assert costs["usd_per_training_run"] == {"cpu": 0.036, "gpu": 0.01, "unknown-gpu": None}  # gpu: 10 s at $3.6/h
    assert costs["cheapest_compute"] == "gpu" and costs["cheapest_api_usd_per_million_output_tokens"] == 0.6
    report = (measured_workspace / "runs" / "demo-run" / "cost.md").read_text()
    assert "## Cost" in report and "| cpu | 0.3600 | 100.0 | measured here | 1.0000 | 0.036000 |" in report


def test_default_price_table_and_a_broken_one(measured_workspace: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["cost", "--serving-tps", "300", "--workspace", str(measured_workspace), "--json"])
    assert result.exit_code == 0, result.output
    costs = json.loads(result.stdout)
    assert costs["usd_per_million_tokens"]["self-hosted-cpu-2vcpu"] == pytest.approx(0.05 / (300 * 3600) * 1e6, 1e-3)
    assert costs["usd_per_training_run"]["self-hosted-cpu-2vcpu"] is not None
    assert "openai-gpt-4o-mini" in costs["api"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("compute:\n  box: {serving_tokens_per_second: 5}\n")
    result = runner.invoke(app, ["cost", "--prices", str(broken), "--workspace", str(measured_workspace)])
    assert result.exit_code == 2 and "compute.box needs usd_per_hour or usd_per_second" in result.output


def test_a_multi_node_run_pays_for_every_machine() -> None:
    from tuneloop.cost.estimate import Measured, estimate_costs

    table = {"compute": {"node": {"usd_per_hour": 1.0, "training_tokens_per_second": "measured"}}}
    one = Measured(training_tokens=3600, training_tokens_per_second=1.0)
    two = Measured(training_tokens=3600, training_tokens_per_second=1.0, training_nodes=2)
    assert estimate_costs(table, one)["usd_per_training_run"]["node"] == pytest.approx(1.0)
    assert estimate_costs(table, two)["usd_per_training_run"]["node"] == pytest.approx(2.0)


def test_platform_rows_priced_at_the_stated_throughput_beside_api_prices(measured_workspace: Path) -> None:
    from typing import get_args

    from tuneloop.cli.cost_commands import PlatformChoice
    from tuneloop.cost.estimate import Platform

    assert get_args(PlatformChoice) == get_args(Platform)
    ws = ["--workspace", str(measured_workspace), "--json"]
    unstated = json.loads(runner.invoke(app, ["cost", "--platform", "modal", *ws]).stdout)
    assert {row["platform"] for row in unstated["compute"]} == {"modal"}
    assert all(row["usd_per_million_tokens"] is None for row in unstated["compute"])  # no GPU figure is invented
    result = runner.invoke(app, ["cost", "--platform", "modal", "--serving-tps", "2000", *ws])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["compute"]}
    l4 = rows["modal-l4"]
    assert (
        l4["usd_per_hour"] == pytest.approx(0.000222 * 3600, 1e-3) and l4["serving_basis"] == "stated (--serving-tps)"
    )
    assert l4["usd_per_million_tokens"] == pytest.approx(0.000222 / 2000 * 1e6, 1e-3)
    assert l4["vs_cheapest_api"] == pytest.approx(l4["usd_per_million_tokens"] / 0.4, 1e-2)  # gpt-4.1-nano's $0.40
    cpu = json.loads(runner.invoke(app, ["cost", "--platform", "cpu", "--serving-tps", "300", *ws]).stdout)
    assert {row["serving_basis"] for row in cpu["compute"]} == {"measured here"}
    table = runner.invoke(
        app,
        ["cost", "--platform", "sagemaker", "--serving-tps", "900", "--workspace", str(measured_workspace)],
        env={"COLUMNS": "200"},
    )
    assert table.exit_code == 0 and "sagemaker-ml-g5-2xlarge" in table.output and "x cheapest API" in table.output
    bad = runner.invoke(app, ["cost", "--platform", "azure", *ws])
    assert bad.exit_code != 0 and "azure" in bad.output
