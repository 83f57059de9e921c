from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import write_config, write_jsonl
from tuneloop.cli import app
from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.data.render import IGNORE_INDEX
from tuneloop.workspace import Workspace

runner = CliRunner()


def alpaca_rows(count: int) -> list[dict]:
    return [
        {"instruction": f"Repeat the number {i} in words please", "input": "", "output": f"number {i} is {i}"}
        for i in range(count)
    ]


def prepare(config_path: Path, *overrides: str, force: bool = False):
    return prepare_dataset(load_config(config_path, list(overrides)), Workspace.from_env(), force=force)


def test_prepare_end_to_end_with_quarantine_and_report(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    rows = [
        *alpaca_rows(40),
        "{this is not json",
        {"instruction": "no output here"},
        {"instruction": "wrong type", "output": 42},
        {"instruction": "Repeat the number 3 in words please", "input": "", "output": "number 3 is 3"},  # duplicate
        {"instruction": "x " * 300, "output": "too long"},
        {"instruction": "a", "output": "b"},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(
        tmp_path, tiny_model_dir, [{"path": "train.jsonl"}], filters={"min_tokens": 15}, packing=False
    )  # unpacked: the train rows are checked one by one
    result = runner.invoke(app, ["data", "prepare", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["detected_formats"] == {str(tmp_path / "train.jsonl"): "alpaca"}
    assert summary["train_rows"] + summary["val_rows"] == 40
    assert summary["val_rows"] == 4
    assert summary["quarantined"] == 6
    filtered = summary["filtered"]
    assert (filtered["malformed"], filtered["missing_field"], filtered["duplicate"]) == (2, 1, 1)
    assert (filtered["too_long"], filtered["too_short"]) == (1, 1)
    dataset = Path(summary["path"])
    quarantine = [json.loads(line) for line in (dataset / "quarantine.jsonl").read_text().splitlines()]
    by_line = {entry["line"]: entry for entry in quarantine}
    assert by_line[41]["reason"] == "malformed" and by_line[41]["raw"] == "{this is not json"
    assert by_line[42]["reason"] == "missing_field" and "'output' is missing" in by_line[42]["detail"]
    assert by_line[43]["reason"] == "malformed" and by_line[43]["data"]["output"] == 42  # the row itself is kept
    assert by_line[44]["reason"] == "duplicate"
    assert all(entry["source"].endswith("train.jsonl") for entry in quarantine)
    # artifacts
    html = Path(summary["report"]).read_text()
    assert "token length histogram" in html and 'class="trained"' in html and "near_duplicate" in html
    assert (dataset / "token_lengths.png").stat().st_size > 1000
    assert "Filtered, by reason" in (dataset / "report.md").read_text()
    train = pq.read_table(dataset / "train.parquet").to_pylist()
    assert len(train) == 36
    assert all(len(r["input_ids"]) == len(r["labels"]) for r in train)
    assert all(any(label != IGNORE_INDEX for label in r["labels"]) for r in train)
    conversations = [json.loads(line) for line in (dataset / "val.jsonl").read_text().splitlines()]
    assert conversations[0]["messages"][-1]["role"] == "assistant" and conversations[0]["line"] >= 1


def test_split_is_deterministic_and_seeded(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(50))
    config = write_config(tmp_path, tiny_model_dir, [{"path": "d.jsonl"}])

    def val_lines(*overrides: str) -> list[int]:
        prepared = prepare(config, *overrides, force=True)
        return [json.loads(line)["line"] for line in prepared.paths.conversations("val").read_text().splitlines()]

    first, again = val_lines(), val_lines()
    assert first == again and len(first) == 5
    assert val_lines("data.seed=7") != first
    assert len(val_lines("data.val_fraction=0.2")) == 10


def test_fingerprint_cache_hit_and_invalidation(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    config = write_config(tmp_path, tiny_model_dir, [{"path": "d.jsonl"}])
    first = prepare(config)
    assert not first.cache_hit
    second = prepare(config)
    assert second.cache_hit and second.dataset_id == first.dataset_id
    assert prepare(config, "data.max_seq_len=128").dataset_id != first.dataset_id
    write_jsonl(data, alpaca_rows(21))
    assert prepare(config).dataset_id != first.dataset_id
    assert prepare(config, force=True).cache_hit is False


def test_packing_writes_position_ids_per_row(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    config = write_config(tmp_path, tiny_model_dir, [{"path": "d.jsonl"}], packing=True, max_seq_len=200)
    prepared = prepare(config)
    packed = pq.read_table(prepared.paths.parquet("train")).to_pylist()
    assert prepared.manifest.counts.train_rows == 27
    assert len(packed) < 27
    assert sum(len(p["seq_lengths"]) for p in packed) == 27
    for sample in packed:
        offset = 0
        for length in sample["seq_lengths"]:
            assert sample["position_ids"][offset : offset + length] == list(range(length))
            assert sample["labels"][offset] == IGNORE_INDEX
            offset += length
        assert offset == len(sample["input_ids"]) <= 200
    assert 0 < prepared.manifest.packing.efficiency <= 1


def test_truncation_keeps_long_rows(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "short", "output": "word " * 200}, *alpaca_rows(5)])
    config = write_config(tmp_path, tiny_model_dir, [{"path": "d.jsonl"}], max_seq_len=64)
    assert prepare(config).manifest.counts.filtered["too_long"] == 1
    truncated = prepare(config, "data.truncation=true")
    assert truncated.manifest.counts.kept == 6
    assert truncated.manifest.tokens.truncated_rows == 1 and truncated.manifest.tokens.max == 64


def test_multiple_sources_and_mixed_formats(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(10)
        ],
    )
    (tmp_path / "c.csv").write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    config = write_config(
        tmp_path,
        tiny_model_dir,
        [
            {"path": "a.jsonl"},
            {"path": "b.jsonl"},
            {"path": "c.csv", "format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}},
        ],
    )
    summary = prepare(config).summary()
    assert sorted(summary["detected_formats"].values()) == ["alpaca", "messages", "prompt_completion"]
    assert summary["train_rows"] + summary["val_rows"] == 30


def test_cli_errors_name_the_problem(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, [{"path": "missing.jsonl"}])
    result = runner.invoke(app, ["data", "prepare", "-c", str(config)])
    assert result.exit_code == 2
    assert "data source not found" in result.output and "missing.jsonl" in result.output
    (tmp_path / "odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    config = write_config(tmp_path, tiny_model_dir, [{"path": "odd.jsonl"}])
    result = runner.invoke(app, ["data", "prepare", "-c", str(config), "--json"])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert "odd.jsonl: cannot detect the format" in payload["error"] and "columns" in payload["hint"]


@pytest.mark.parametrize(
    "set_value", ["data.filters.toxicity.enabled=true", "data.filters.near_duplicates.enabled=true"]
)
def test_filters_can_be_switched_on_from_the_cli(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path, set_value: str
) -> None:
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    config = write_config(tmp_path, tiny_model_dir, [{"path": "d.jsonl"}])
    result = runner.invoke(app, ["data", "prepare", "-c", str(config), "--set", set_value, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train_rows"] > 0


@pytest.mark.slow
def test_quickstart_with_the_real_smollm2_tokenizer(workspace: Path) -> None:
    """`make demo`'s job on a smaller slice: bundled model, built-in data, SmolLM2's own chat template."""
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    result = runner.invoke(
        app, ["data", "prepare", "-c", str(quickstart), "--set", "data.sources.0.num_rows=300", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["detected_formats"].values()) == ["alpaca"]
    assert summary["train_rows"] + summary["val_rows"] == 300 - summary["quarantined"]
    assert summary["train_samples"] < summary["train_rows"]  # packed
    manifest = json.loads((Path(summary["path"]) / "manifest.json").read_text())
    assert manifest["tokenizer"]["eos_token"] == "<|im_end|>" and manifest["tokenizer"]["pad_equals_eos"]
    assert manifest["model"]["chat_template_source"] == "tokenizer"
    markdown = (Path(summary["path"]) / "report.md").read_text()
    assert '<|im_start|>assistant\n⟦{"name": ' in markdown and "<|im_end|>\n⟧" in markdown
