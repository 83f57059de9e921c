"""Label Studio as a data source: prepared rows and model answers out as tasks, annotations back in as rows.

The exports the tests import are built by the `label-studio-sdk` package itself (its `LabelInterface` validates the
labeling configs tuneloop writes and each task against them, its control tags make every result, its `Annotation`
type lays out each annotation): `tests/data/labelstudio_sdk_export.py`, run by .venv-labelstudio's Python (`make
test` installs it; the SDK pins numpy below the project's, so it cannot live in .venv).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import write_config, write_jsonl
from tuneloop.cli import app

ROOT = Path(__file__).resolve().parents[2]
LABELSTUDIO_PYTHON = Path(os.environ.get("TUNELOOP_LABELSTUDIO_PYTHON", ROOT / ".venv-labelstudio" / "bin" / "python"))
SDK_EXPORT = Path(__file__).with_name("labelstudio_sdk_export.py")
runner = CliRunner()


def sdk_export(export_dir: Path, plan: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """Label Studio's JSON export of the tasks in `export_dir`, annotated per `plan`, built with the SDK."""
    if not LABELSTUDIO_PYTHON.exists():
        pytest.skip(
            f"label-studio-sdk's virtualenv is missing ({LABELSTUDIO_PYTHON}): `make labelstudio` installs it "
            "(python -m venv .venv-labelstudio && .venv-labelstudio/bin/pip install label-studio-sdk==2.1.2)"
        )
    plan_file = out.with_suffix(".plan.json")
    plan_file.write_text(json.dumps(plan))
    done = subprocess.run(
        [
            str(LABELSTUDIO_PYTHON),
            str(SDK_EXPORT),
            str(export_dir / "labeling_config.xml"),
            str(export_dir / "tasks.json"),
            str(plan_file),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def cli(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def annotation(number: int, values: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": number, "completed_by": fields.pop("user", 1), "values": values, **fields}


def prepared_rows(dataset: Path) -> list[list[dict[str, str]]]:
    rows = []
    for split in ("train", "val"):
        for line in (dataset / f"{split}.jsonl").read_text().splitlines():
            rows.append(json.loads(line)["messages"])
    return rows


@pytest.fixture
def prepared(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> Path:
    """A prepared dataset of 7 conversations (its train.jsonl and val.jsonl are what gets exported)."""
    rows = [{"instruction": f"Spell the number {n}", "output": f"the number is {n}"} for n in range(1, 8)]
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(write_jsonl(tmp_path / "rows.jsonl", rows))}])
    return Path(cli("data", "prepare", "-c", str(config))["path"])


def test_corrected_answers_come_back_as_sft_rows(
    prepared: Path, tmp_path: Path, tiny_model_dir: Path, workspace: Path
) -> None:
    exported = cli("data", "export-labelstudio", str(prepared), "--out", str(tmp_path / "ls"), "--mode", "correct")
    assert exported["count"] == 7
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    by_answer = {task["data"]["answer"]: task for task in tasks}
    task = {n: by_answer[f"the number is {n}"]["id"] for n in range(1, 8)}
    assert by_answer["the number is 1"]["data"]["messages"] == [{"role": "user", "content": "Spell the number 1"}]

    def rated(number: int, rating: int, text: str, **fields: Any) -> dict[str, Any]:
        return annotation(number, {"rating": {"rating": rating}, "correct_answer": {"text": [text]}}, **fields)

    plan = {
        # accepted as it is (rated 5, text untouched), beside a skipped annotation that is dropped and counted
        str(task[1]): [rated(11, 5, "the number is 1"), annotation(12, {}, was_cancelled=True, user=2)],
        str(task[2]): [rated(21, 2, "two, spelled t-w-o")],
        str(task[3]): [rated(31, 1, "the number is 3")],  # rated low, not corrected: rejected
        str(task[4]): [annotation(41, {}, was_cancelled=True)],  # skipped by its only annotator
        # two annotators: the most recently updated one decides
        str(task[5]): [
            rated(51, 2, "five (old)", updated_at="2026-11-02T10:00:00Z"),
            rated(52, 2, "five (new)", updated_at="2026-11-03T10:00:00Z", user=2),
        ],
        # a ground-truth annotation decides over a newer one
        str(task[6]): [
            rated(61, 3, "six (ground truth)", ground_truth=True, updated_at="2026-11-02T10:00:00Z"),
            rated(62, 5, "the number is 6", updated_at="2026-11-05T10:00:00Z", user=2),
        ],
        # task 7: never annotated
    }
    export = sdk_export(tmp_path / "ls", plan, tmp_path / "project-1-export.json")

    counted = cli("data", "import-labelstudio", str(export), "--out", str(tmp_path / "rows.jsonl"))
    assert counted["sft_rows"] == 4 and counted["preference_rows"] == 0
    assert counted["cancelled_annotations"] == 2
    assert counted["dropped_tasks"] == {"rejected": 1, "skipped": 1, "unlabeled": 1}

    # the export itself as a data source of `tuneloop data prepare`
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(export)}], val_fraction=0.0)
    summary = cli("data", "prepare", "-c", str(config))
    assert summary["train_rows"] == 4
    answers = {messages[0]["content"]: messages[-1]["content"] for messages in prepared_rows(Path(summary["path"]))}
    assert answers == {
        "Spell the number 1": "the number is 1",
        "Spell the number 2": "two, spelled t-w-o",
        "Spell the number 5": "five (new)",
        "Spell the number 6": "six (ground truth)",
    }
    quarantine = [json.loads(line) for line in Path(summary["quarantine"]).read_text().splitlines()]
    details = sorted(entry["detail"] for entry in quarantine)
    assert details == sorted(
        [
            f"Label Studio task {task[3]}, annotation 31: the answer was rated 1 and not corrected [rejected]",
            f"Label Studio task {task[4]}: every annotation (1) was skipped [skipped]",
            f"Label Studio task {task[7]}: it has no annotation [unlabeled]",
        ]
    )


def outputs_file(tmp_path: Path) -> Path:
    """An evaluation's outputs.jsonl with two models' answers."""
    rows = [
        {
            "id": f"r{n}",
            "prompt": f"What is {n} + {n}?",
            "messages": [{"role": "user", "content": f"What is {n} + {n}?"}, {"role": "assistant", "content": "x"}],
            "reference": str(2 * n),
            "outputs": {"tuned": f"{2 * n}", "base": f"maybe {n}"},
        }
        for n in range(1, 6)
    ]
    return write_jsonl(tmp_path / "outputs.jsonl", rows)


def test_choices_come_back_as_preference_rows(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    exported = cli(
        "data", "export-labelstudio", str(outputs_file(tmp_path)), "-o", str(tmp_path / "ls"), "--mode", "pairwise"
    )
    assert exported["count"] == 5
    tasks = {task["data"]["row_id"]: task for task in json.loads((tmp_path / "ls" / "tasks.json").read_text())}
    # which position shows the tuned answer is shuffled: vote for it by its position
    tuned_at = {row: "A" if task["data"]["answer_a"].isdigit() else "B" for row, task in tasks.items()}
    assert set(tuned_at.values()) == {"A", "B"}
    base_at = {row: "B" if position == "A" else "A" for row, position in tuned_at.items()}

    def vote(number: int, position: str, user: int = 1) -> dict[str, Any]:
        return annotation(number, {"preference": {"choices": [position]}}, user=user)

    plan = {
        str(tasks["r1"]["id"]): [vote(11, tuned_at["r1"])],
        str(tasks["r2"]["id"]): [vote(21, base_at["r2"]), vote(22, base_at["r2"], 2), vote(23, tuned_at["r2"], 3)],
        str(tasks["r3"]["id"]): [vote(31, "Tie")],
        str(tasks["r4"]["id"]): [vote(41, "A"), vote(42, "B", 2)],  # an even split: no majority
        str(tasks["r5"]["id"]): [vote(51, base_at["r5"]), annotation(52, {}, was_cancelled=True, user=2)],
    }
    export = sdk_export(tmp_path / "ls", plan, tmp_path / "pairs-export.json")
    counted = cli("data", "import-labelstudio", str(export), "--out", str(tmp_path / "pairs.jsonl"))
    assert counted["preference_rows"] == 3 and counted["sft_rows"] == 0
    assert counted["dropped_tasks"] == {"tie": 2} and counted["cancelled_annotations"] == 1
    pairs = {
        row["prompt"][0]["content"]: (row["chosen"][0]["content"], row["rejected"][0]["content"])
        for row in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines())
    }
    assert pairs == {
        "What is 1 + 1?": ("2", "maybe 1"),
        "What is 2 + 2?": ("maybe 2", "4"),
        "What is 5 + 5?": ("maybe 5", "10"),
    }
    row = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "2"}]

    # the export as a source of `tuneloop data prepare`: a preference dataset
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(export)}], val_fraction=0.0)
    summary = cli("data", "prepare", "-c", str(config))
    assert summary["train_rows"] == 3
    assert list(summary["detected_formats"].values()) == ["preference"]


def test_a_malformed_export_names_the_task(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    good = {"id": 1, "data": {"prompt": "Say hi", "answer": "hi"}, "annotations": [_result(7, "rating", {"rating": 5})]}
    bad_choice = {
        "id": 42,
        "data": {"prompt": "Pick", "answer_a": "a", "answer_b": "b"},
        "annotations": [_result(9, "choices", {"choices": ["C"]}, name="preference")],
    }
    no_result = {"id": 43, "data": {"prompt": "Say", "answer": "x"}, "annotations": [{"id": 10, "result": "oops"}]}
    export = tmp_path / "export.json"
    export.write_text(json.dumps([good, bad_choice, no_result]))
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(export)}], val_fraction=0.0)
    summary = cli("data", "prepare", "-c", str(config))
    assert summary["train_rows"] == 1
    details = [json.loads(line)["detail"] for line in Path(summary["quarantine"]).read_text().splitlines()]
    assert "Label Studio task 42, annotation 9: preference is 'C', not A, B or Tie [malformed]" in details
    assert "Label Studio task 43, annotation 10: `result` is not a list [malformed]" in details

    not_a_task = tmp_path / "broken.json"
    not_a_task.write_text(json.dumps([good, {"id": 5, "annotations": []}]))
    refused = runner.invoke(
        app, ["data", "import-labelstudio", str(not_a_task), "--out", str(tmp_path / "x.jsonl"), "--json"]
    )
    assert refused.exit_code == 2
    assert "item 2 (id 5) is not a Label Studio task" in json.loads(refused.stdout)["error"]


def _result(number: int, kind: str, value: dict[str, Any], name: str = "rating") -> dict[str, Any]:
    item = {"from_name": name, "to_name": "answer", "type": kind, "value": value}
    return {"id": number, "completed_by": 1, "was_cancelled": False, "result": [item]}


def test_pairwise_needs_two_answers(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    refused = runner.invoke(app, ["data", "export-labelstudio", str(rows), "-o", str(tmp_path), "--mode", "pairwise"])
    assert refused.exit_code == 2
    assert "pairwise tasks need two answers" in refused.output


def test_label_studios_pairwise_tag_and_a_ground_truth_vote() -> None:
    from tuneloop.data.labelstudio import row_from_task

    def pairwise(number: int, selected: str, **fields: Any) -> dict[str, Any]:
        item = {"from_name": "pw", "to_name": "answer_a,answer_b", "type": "pairwise", "value": {"selected": selected}}
        return {"id": number, "completed_by": number, "result": [item], **fields}

    task = {
        "id": 3,
        "data": {"prompt": "Which?", "answer_a": "left one", "answer_b": "right one"},
        "annotations": [pairwise(1, "left"), pairwise(2, "left"), pairwise(3, "right", ground_truth=True)],
    }
    row = row_from_task(task)
    assert row["chosen"] == [{"role": "assistant", "content": "right one"}]  # ground truth outweighs the majority
    assert row["prompt"] == [{"role": "user", "content": "Which?"}]
    task["annotations"] = task["annotations"][:2]
    assert row_from_task(task)["chosen"][0]["content"] == "left one"
