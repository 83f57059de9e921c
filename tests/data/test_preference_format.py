"""Preference data: every layout detected and normalised, bad rows quarantined with the field named, the prepared
pair dataset (rendered with the chat template, split, provenance carried), mixing refused, and real demo files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_config, write_jsonl
from tuneloop.config import SourceConfig
from tuneloop.config_file import load_config
from tuneloop.data.formats import RowError, detect_format, prepare_record
from tuneloop.data.preference import normalise_preference
from tuneloop.data.prepare import prepare_dataset
from tuneloop.errors import ConfigError, DataError
from tuneloop.workspace import Workspace

SOURCE = SourceConfig(path="-")
USER = {"role": "user", "content": "Name a colour."}

LAYOUTS: dict[str, dict[str, Any]] = {
    "standard": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    "conversational": {
        "prompt": [{"role": "system", "content": "Be brief."}, USER],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    },
    "implicit_prompt": {
        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Seven."}],
    },
    "sharegpt_ranking": {  # LLaMA-Factory's dpo_en_demo.json layout
        "conversations": [{"from": "human", "value": "Name a colour."}],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."},
    },
    "messages_as_prompt": {
        "messages": [USER],
        "chosen": {"role": "assistant", "content": "Blue."},
        "rejected": {"role": "assistant", "content": "Seven."},
    },
}


def _as_tuples(messages: list) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in messages]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_detected_and_becomes_one_pair(layout: str) -> None:
    row = LAYOUTS[layout]
    assert detect_format([row], "src") == "preference"
    prompt, chosen, rejected = normalise_preference(prepare_record(row, SOURCE), SOURCE)
    assert _as_tuples(prompt)[-1] == ("user", "Name a colour.")
    assert _as_tuples(chosen) == [("assistant", "Blue.")]
    assert _as_tuples(rejected) == [("assistant", "Seven.")]
    if layout == "conversational":
        assert _as_tuples(prompt)[0] == ("system", "Be brief.")


def test_columns_map_onto_the_preference_fields() -> None:
    source = SourceConfig(path="-", columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    record = prepare_record({"question": "Q?", "good": "yes", "bad": "no"}, source)
    prompt, chosen, rejected = normalise_preference(record, source)
    assert (_as_tuples(prompt), chosen[0].content, rejected[0].content) == ([("user", "Q?")], "yes", "no")


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        ({"prompt": "Q", "chosen": "A"}, "missing_field", "'rejected'"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, "missing_field", "'chosen'"),
        ({"prompt": [USER], "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}, "malformed", "'chosen'"),
        ({"prompt": "Q", "chosen": "A", "rejected": 3}, "malformed", "'rejected'"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "A", "rejected": "B"}, "malformed", "'prompt'"),
        ({"chosen": "A", "rejected": "B"}, "missing_field", "'prompt'"),
        ({"prompt": "Q", "chosen": "Same", "rejected": "Same"}, "malformed", "same answer"),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "A"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "B"}],
            },
            "malformed",
            "share no opening turns",
        ),
    ],
)
def test_bad_rows_name_the_field(row: dict, reason: str, field: str) -> None:
    with pytest.raises(RowError) as caught:
        normalise_preference(prepare_record(row, SOURCE), SOURCE)
    assert caught.value.reason == reason
    assert field in caught.value.detail


def test_kto_rows_are_recognised_and_refused() -> None:
    rows = [{"messages": [USER, {"role": "assistant", "content": "Blue."}], "label": True}]
    with pytest.raises(DataError, match="KTO"):
        detect_format(rows, "kto.json")


def _pairs(count: int) -> list[dict]:
    """The layout `tuneloop data from-feedback` writes: conversational, one assistant message per answer."""
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"I think {i} plus {i} is {2 * i + 1}."}],
        }
        for i in range(count)
    ]


def test_prepare_renders_pairs_splits_quarantines_and_carries_provenance(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path
) -> None:
    rows: list[Any] = _pairs(20)
    rows.insert(3, {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}]})  # no rejected
    rows.insert(7, "{not json")
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    provenance = {"generator": "tuneloop data from-feedback", "feedback_window": {"from": 1.0, "to": 2.0}}
    (tmp_path / "pairs.jsonl.provenance.json").write_text(json.dumps(provenance))
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(source)}], val_fraction=0.2)

    prepared = prepare_dataset(load_config(config), Workspace.from_env())

    summary = prepared.summary()
    assert summary["kind"] == "preference" == prepared.manifest.kind
    assert summary["detected_formats"] == {str(source): "preference"}
    assert (summary["train_rows"], summary["val_rows"], summary["quarantined"]) == (16, 4, 2)
    quarantine = [json.loads(line) for line in prepared.paths.quarantine.read_text().splitlines()]
    by_line = {entry["line"]: entry for entry in quarantine}
    assert by_line[4]["reason"] == "missing_field" and "'rejected'" in by_line[4]["detail"]
    assert by_line[8]["reason"] == "malformed"
    assert prepared.manifest.provenance == {str(source): provenance}

    table = pq.read_table(prepared.paths.parquet("train")).to_pylist()
    first = table[0]
    # rendered with the chat template: the prompt ends with the generation prompt, each answer with end-of-turn
    assert first["prompt"].startswith("<|im_start|>user\n") and first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["chosen"].endswith("<|im_end|>") and first["rejected"].endswith("<|im_end|>")
    assert first["chosen"] != first["rejected"]
    # prompt + chosen as tokenized SFT rows, for perplexity in `tuneloop eval`
    assert any(label != -100 for label in first["labels"]) and first["labels"][0] == -100
    conversation = json.loads(prepared.paths.conversations("val").read_text().splitlines()[0])
    assert conversation["messages"][-1]["role"] == "assistant" and conversation["rejected"][0]["role"] == "assistant"


def test_long_pairs_are_dropped_or_kept_for_truncation(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    rows = [*_pairs(10), {"prompt": "Q", "chosen": "long " * 200, "rejected": "B"}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dropped = prepare_dataset(
        load_config(write_config(tmp_path, tiny_model_dir, [{"path": str(source)}])), Workspace.from_env()
    )
    assert dropped.manifest.counts.filtered["too_long"] == 1
    # with data.truncation the pair stays; TRL cuts it to max_seq_len (the prompt kept, the answer's end lost)
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(source)}], truncation=True)
    kept = prepare_dataset(load_config(config), Workspace.from_env())
    assert kept.manifest.counts.filtered["too_long"] == 0 and kept.manifest.tokens.truncated_rows == 1


def test_mixing_preference_and_sft_sources_names_both(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(5))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi", "output": "hi"}] * 5)
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(pairs)}, {"path": str(sft)}])
    with pytest.raises(ConfigError) as caught:
        prepare_dataset(load_config(config), Workspace.from_env())
    assert str(pairs) in str(caught.value) or "pairs.jsonl" in str(caught.value)
    assert "sft.jsonl (alpaca)" in str(caught.value)


def test_llamafactory_dpo_demo_prepares(
    shared_data: Path, tmp_path: Path, tiny_model_dir: Path, workspace: Path
) -> None:
    path = (shared_data / "llamafactory_demo" / "dpo_en_demo.json").resolve()
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(path)}], max_seq_len=4096)
    summary = prepare_dataset(load_config(config), Workspace.from_env()).summary()
    assert summary["detected_formats"] == {str(path): "preference"}
    assert summary["rows_read"] == 300
    kept = summary["train_rows"] + summary["val_rows"]
    assert kept + summary["quarantined"] == 300 and kept > 150
    assert summary["val_rows"] == round(kept * 0.1)


def test_llamafactory_kto_demo_is_refused_clearly(
    shared_data: Path, tmp_path: Path, tiny_model_dir: Path, workspace: Path
) -> None:
    path = shared_data / "llamafactory_demo" / "kto_en_demo.json"
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(path)}])
    with pytest.raises(DataError, match="KTO"):
        prepare_dataset(load_config(config), Workspace.from_env())
