from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tuneloop.config import SourceConfig
from tuneloop.data.formats import RowError, detect_format, normalise, prepare_record
from tuneloop.data.sources import read_records
from tuneloop.errors import DataError

SOURCE = SourceConfig(path="x")


def roles(messages: list) -> list[tuple[str, str, bool]]:
    return [(m.role, m.content, m.train) for m in messages]


def test_alpaca_with_input_system_and_history() -> None:
    record = {
        "instruction": "Add",
        "input": "2 and 3",
        "output": "5",
        "system": "Be exact.",
        "history": [["hi", "hello"]],
    }
    messages, kind = normalise(record, "alpaca", SOURCE)
    assert kind == "chat"
    assert roles(messages) == [
        ("system", "Be exact.", False),
        ("user", "hi", False),
        ("assistant", "hello", True),
        ("user", "Add\n\n2 and 3", False),
        ("assistant", "5", True),
    ]


def test_sharegpt_multi_turn_with_system_and_tools() -> None:
    record = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "find a recipe"},
            {"from": "function_call", "value": '{"name": "search"}'},
            {"from": "observation", "value": '{"hits": 1}'},
            {"from": "gpt", "value": "Here is one."},
        ],
    }
    messages, _ = normalise(record, "sharegpt", SOURCE)
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_messages_with_parts_and_loss_weight() -> None:
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "hi"}]},
            {"role": "assistant", "content": "first", "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
            {"role": "assistant", "content": "second"},
        ]
    }
    messages, _ = normalise(record, "messages", SOURCE)
    assert roles(messages)[1] == ("assistant", "first", False)
    assert roles(messages)[2] == ("user", "again", False)
    assert roles(messages)[3] == ("assistant", "second", True)


def test_prompt_completion_string_and_conversational() -> None:
    messages, _ = normalise({"prompt": "Q?", "response": "A."}, "prompt_completion", SOURCE)
    assert roles(messages) == [("user", "Q?", False), ("assistant", "A.", True)]
    conversational = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "completion": [{"role": "assistant", "content": "A."}],
    }
    messages, _ = normalise(conversational, "prompt_completion", SOURCE)
    assert [m.role for m in messages] == ["user", "assistant"]


def test_text_format() -> None:
    messages, kind = normalise({"text": "plain words"}, "text", SOURCE)
    assert kind == "text" and messages[0].content == "plain words"


@pytest.mark.parametrize(
    ("record", "fmt", "reason", "fragment"),
    [
        ({"instruction": "x"}, "alpaca", "missing_field", "'output' is missing"),
        ({"instruction": "x", "output": "  "}, "alpaca", "missing_field", "'output' is empty"),
        ({"instruction": "x", "output": 5}, "alpaca", "malformed", "must be text, got int"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "malformed", "unknown role"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt", "missing_field", "no assistant turn"),
        ({"messages": "oops"}, "messages", "malformed", "non-empty list"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages", "malformed", "non-text"),
    ],
)
def test_bad_rows_raise_row_errors(record: dict, fmt: str, reason: str, fragment: str) -> None:
    with pytest.raises(RowError) as error:
        normalise(record, fmt, SOURCE)
    assert error.value.reason == reason
    assert fragment in error.value.detail


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"instruction": "a", "input": "", "output": "b"}], "alpaca"),
        ([{"conversations": []}], "sharegpt"),
        ([{"messages": []}], "messages"),
        ([{"prompt": "a", "completion": "b"}], "prompt_completion"),
        ([{"prompt": "a", "response": "b"}], "prompt_completion"),
        ([{"text": "a"}], "text"),
    ],
)
def test_detect_format(rows: list[dict], expected: str) -> None:
    assert detect_format(rows, "src") == expected


def test_detect_rejects_unknown_data_and_finds_preference_data() -> None:
    with pytest.raises(DataError, match="cannot detect the format"):
        detect_format([{"question": "a", "answer": "b"}], "src.jsonl")
    # preference pairs are their own format now (tests/data/test_preference_format.py)
    assert detect_format([{"prompt": "a", "chosen": "b", "rejected": "c"}], "src.jsonl") == "preference"


def test_column_mapping_defaults_and_value_map() -> None:
    source = SourceConfig(
        path="x",
        columns={"input": "sentence", "output": "label"},
        defaults={"instruction": "Classify the sentiment."},
        value_map={"output": {"0": "negative", "1": "positive"}},
    )
    record = prepare_record({"sentence": "great film", "label": 1}, source)
    messages, _ = normalise(record, detect_format([record], "x"), source)
    assert roles(messages) == [
        ("user", "Classify the sentiment.\n\ngreat film", False),
        ("assistant", "positive", True),
    ]


# -- reading files ----------------------------------------------------------------------------------------------------
def test_jsonl_keeps_line_numbers_and_marks_malformed_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{not json", {"text": "b"}])
    records = list(read_records(path))
    assert [(r.line, r.error is None) for r in records] == [(1, True), (2, False), (3, True)]
    assert "invalid JSON" in records[1].error and records[1].raw_text == "{not json"


def test_json_array_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}], indent=2))
    assert [r.line for r in read_records(path)] == [2, 5, 8]


def test_json_array_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 3"):
        list(read_records(path))


def test_csv_tsv_parquet_txt(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\n"a, with comma",b\nonly-one-field\nc,d\n')
    records = list(read_records(csv_path))
    assert records[0].data == {"prompt": "a, with comma", "completion": "b"}
    assert records[1].error and "fields" in records[1].error and records[1].line == 3
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text('sentence\tlabel\nit \'s a "great" film\t1\n')
    assert next(iter(read_records(tsv_path))).data == {"sentence": 'it \'s a "great" film', "label": "1"}
    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", "y"]}), parquet_path)
    assert [r.data["text"] for r in read_records(parquet_path)] == ["x", "y"]
    txt_path = tmp_path / "d.txt"
    txt_path.write_text("first line\n\nsecond line\n")
    assert [(r.line, r.data["text"]) for r in read_records(txt_path)] == [(1, "first line"), (3, "second line")]


def test_datasets_folder(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "x"}]), "test": Dataset.from_list([{"text": "y"}])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert [r.data["text"] for r in read_records(tmp_path / "dd")] == ["x"]
    assert [r.data["text"] for r in read_records(tmp_path / "dd", split="test")] == ["y"]
    with pytest.raises(DataError, match="available: train, test"):
        list(read_records(tmp_path / "dd", split="validation"))


def test_unreadable_inputs_stop_with_the_file_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no rows"):
        list(read_records(empty))
    with pytest.raises(DataError, match=r"data source not found"):
        list(read_records(tmp_path / "missing.jsonl"))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        list(read_records(odd))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: not UTF-8"):
        list(read_records(latin))
