from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture
def train_config(tmp_path: Path, tiny_model_dir: Path, workspace: Path):
    """Write a small training config on the tiny model; keyword arguments override `train` keys."""
    rows = [{"instruction": f"Repeat the number {i}", "output": f"number {i} is {i}"} for i in range(60)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def make(**train: Any) -> Path:
        config = {
            "project": {"name": "tiny"},
            "model": {"base": str(tiny_model_dir)},
            "data": {
                "sources": [{"path": str(data)}],
                "max_seq_len": 128,
                "packing": train.pop("packing", True),
                "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
            },
            "train": {
                "max_steps": 12,
                "batch_size": 2,
                "learning_rate": 0.01,
                "eval_every": 4,
                "save_every": 4,
                "logging_every": 2,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
                **train,
            },
        }
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make
