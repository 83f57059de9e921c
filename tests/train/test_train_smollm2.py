"""The real bundled model: a few LoRA steps of SmolLM2-135M on real data make the loss go down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_smollm2_lora_on_real_data_lowers_the_loss(shared_data: Path, tmp_path: Path, smollm2_workspace: Path) -> None:
    sst2 = {
        "path": str(shared_data / "sst2" / "dev.tsv"),
        "format": "alpaca",
        "columns": {"input": "content", "output": "label"},
        "defaults": {"instruction": "Is the sentiment of this sentence positive or negative? Answer with one word."},
        "value_map": {"output": {"0": "negative", "1": "positive"}},
        "limit": 240,
    }
    config = {
        "project": {"name": "smollm2-real"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [sst2], "max_seq_len": 256, "packing": True},
        "train": {
            "max_steps": 10,
            "batch_size": 2,
            "learning_rate": 0.0005,
            "eval_every": 5,
            "save_every": 5,
            "logging_every": 1,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "report_to": [],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "-c", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    history = json.loads(
        (Path(summary["run_dir"]) / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text()
    )["log_history"]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert evals[-1] < evals[0]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert summary["precision"] in ("bf16", "fp32") and summary["tokens_per_second"] > 0
