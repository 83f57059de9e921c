"""The data pipeline on real public datasets from ../shared/data (read in place, never copied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_config
from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.workspace import Workspace

CASES = [
    ("self_instruct/seed_tasks.alpaca.json", {}, "alpaca", 175),
    ("llmfoundry_sft/dolly_hhrlhf_train_small.jsonl", {}, "prompt_completion", 1000),
    ("llmfoundry_sft/dolly_hhrlhf_train_small.alpaca.json", {}, "alpaca", 1000),
    ("llamafactory_demo/glaive_toolcall_en_demo.json", {}, "sharegpt", 300),
    ("llamafactory_demo/v1_sft_demo.jsonl", {}, "messages", 500),
    ("llamafactory_demo/alpaca_en_demo.json", {}, "alpaca", 999),
    ("llamafactory_demo/c4_demo.jsonl", {}, "text", 300),
    ("fastchat/dummy_conversation.json", {}, "sharegpt", 500),
    (
        "sst2/dev.tsv",
        {
            "format": "alpaca",
            "columns": {"input": "content", "output": "label"},
            "defaults": {"instruction": "Is the sentiment of this sentence positive or negative?"},
            "value_map": {"output": {"0": "negative", "1": "positive"}},
        },
        "alpaca",
        872,
    ),
]


@pytest.mark.parametrize(("relative", "options", "expected_format", "rows"), CASES, ids=[c[0] for c in CASES])
def test_real_dataset(
    relative: str,
    options: dict,
    expected_format: str,
    rows: int,
    shared_data: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    workspace: Path,
) -> None:
    path = (shared_data / relative).resolve()
    config = write_config(
        tmp_path,
        tiny_model_dir,
        [{"path": str(path), **options}],
        max_seq_len=4096,
        filters={"near_duplicates": {"enabled": True}, "toxicity": {"enabled": True}},
    )
    prepared = prepare_dataset(load_config(config), Workspace.from_env())
    summary = prepared.summary()
    assert summary["detected_formats"] == {str(path): expected_format}
    assert summary["rows_read"] == rows
    kept = summary["train_rows"] + summary["val_rows"]
    assert kept + summary["quarantined"] == rows  # nothing lost: every row is kept or quarantined
    assert kept > 0.5 * rows
    assert summary["val_rows"] == round(kept * 0.1)
    quarantine = [json.loads(line) for line in Path(summary["quarantine"]).read_text().splitlines()]
    assert all(entry["source"] == str(path) and entry["reason"] and entry["detail"] for entry in quarantine)
    conversation = json.loads(prepared.paths.conversations("train").read_text().splitlines()[0])
    if expected_format == "text":
        assert conversation["kind"] == "text"
    else:
        assert any(message["role"] == "assistant" for message in conversation["messages"])


def test_sst2_labels_become_answers(shared_data: Path, tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    path = shared_data / "sst2" / "dev.tsv"
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(path), **CASES[-1][1]}])
    prepared = prepare_dataset(load_config(config), Workspace.from_env())
    answers = {json.loads(line)["messages"][-1]["content"] for line in prepared.paths.conversations("train").open()}
    assert answers == {"positive", "negative"}
