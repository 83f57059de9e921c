from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tiny_model import build_tiny_model, build_tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer-plain"), chat_template=None)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ws"
    monkeypatch.setenv("TUNELOOP_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M converted once per test session (GGUF -> safetensors takes ~20 s)."""
    from tuneloop.models import materialize, resolve_base
    from tuneloop.workspace import Workspace

    return materialize(resolve_base("smollm2-135m-instruct", Workspace(tmp_path_factory.mktemp("smollm2-ws"))))


@pytest.fixture
def smollm2_workspace(workspace: Path, smollm2_folder: Path) -> Path:
    """A fresh workspace whose model cache already holds the converted SmolLM2."""
    (workspace / "models").mkdir(parents=True, exist_ok=True)
    (workspace / "models" / "smollm2-135m-instruct").symlink_to(smollm2_folder)
    return workspace


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_config(directory: Path, model: Path | str, sources: list[dict[str, Any]], **data: Any) -> Path:
    """A loop config for tests; filters default to off so each test turns on what it checks."""
    filters = data.pop("filters", {})
    filters.setdefault("near_duplicates", {"enabled": False})
    filters.setdefault("toxicity", {"enabled": False})
    filters.setdefault("min_tokens", 1)
    config = {
        "model": {"base": str(model)},
        "data": {"sources": sources, "max_seq_len": 256, "filters": filters, **data},
        # In-process generation: a test that checks an engine asks for it (tests/serve/test_offline_engine.py).
        "eval": {"engine": "inprocess"},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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
            "eval": {"engine": "inprocess"},  # a test that checks an engine asks for it
        }
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make
