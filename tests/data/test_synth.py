"""`tuneloop data synth`: synthetic instruction data from a served teacher.

Fast: parsing what a teacher writes, ROUGE-L against rouge-score, the row filters on constructed rows (a copy of
a seed is `duplicate_of_seed`), seed files of every shape, and the errors a user can hit (missing seed file, no
usable row, a reference that is no served model, a teacher nobody answers at). Slow: a real tuneloop gateway serving
SmolLM2-135M on 127.0.0.1 is the teacher, with Self-Instruct's own seed tasks; the checks are the mechanics (rows,
provenance, a reproduced seed answer dropped, `data prepare` reading the output), not the 135M model's taste.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_config, write_jsonl
from tests.serve.servers import start_serve, wait_ready
from tuneloop.cli import app
from tuneloop.config import DataConfig
from tuneloop.data.formats import Message, Sample
from tuneloop.data.synth_filters import GENERATED_SOURCE, InstructionPool, filter_rows, rouge_l
from tuneloop.data.synth_prompts import Task, parse_tasks
from tuneloop.data.synth_seeds import read_seed_tasks
from tuneloop.errors import DataError
from tuneloop.keys import file_sha256
from tuneloop.net import free_port

runner = CliRunner()


# -- parsing the teacher's reply ------------------------------------------------------------------------------------
def test_numbered_replies_parse_into_tasks_with_inputs() -> None:
    reply = """Here are three new tasks:

1. **Instruction:** Write a haiku about autumn leaves.
2) Classify the sentiment of the review. Input: I loved this movie!
Task 3: Summarize the paragraph below.
   Input: The quick brown fox jumps over the lazy dog many times a day.
   Output: A fox jumps.
4. Draw a picture of a cat sitting on a mat.
5. Hi there
6. Explain why the sky is"""
    parsed = parse_tasks(reply, truncated=True)
    assert parsed.tasks == [
        Task("Write a haiku about autumn leaves."),
        Task("Classify the sentiment of the review.", "I loved this movie!"),
        Task("Summarize the paragraph below.", "The quick brown fox jumps over the lazy dog many times a day."),
    ]
    # the cut-off last item, a task for an image model, a fragment of two words
    assert parsed.rejected == {"truncated": 1, "unsuitable": 1, "bad_length": 1}


def test_bullets_paragraphs_and_no_input_markers() -> None:
    bullets = parse_tasks("- Name three fruits that are red.\n- Give a synonym for happy.\nInput: <noinput>")
    assert bullets.tasks == [Task("Name three fruits that are red."), Task("Give a synonym for happy.")]
    assert parse_tasks("Tell me a joke about cats.").tasks == [Task("Tell me a joke about cats.")]
    assert parse_tasks("").tasks == []


def test_rouge_l_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer
    from rouge_score.tokenizers import DefaultTokenizer

    tokenize = DefaultTokenizer().tokenize
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("Write a poem about the sea", "Write a short poem about the ocean and the sea"),
        ("List three fruits", "Name a capital city"),
        ("Same words here", "Same words here"),
    ]
    for candidate, reference in pairs:
        expected = scorer.score(reference, candidate)["rougeL"].fmeasure
        assert rouge_l(tokenize(candidate), tokenize(reference)) == pytest.approx(expected)


def test_instruction_pool_drops_instructions_close_to_seeds_or_each_other() -> None:
    pool = InstructionPool(["Write a poem about the sea."], threshold=0.7)
    assert pool.admit(Task("write a poem about  the SEA.")) == "similar_to_seed"
    assert pool.admit(Task("Write a short poem about the sea.")) == "similar_to_seed"
    assert pool.admit(Task("List three countries in South America.")) is None
    assert pool.admit(Task("List three countries in South America please.")) == "similar_to_generated"


# -- row filters --------------------------------------------------------------------------------------------------
def _row(user: str, answer: str, source: str = GENERATED_SOURCE, row: int = 1) -> Sample:
    return Sample([Message("user", user), Message("assistant", answer, train=True)], "chat", source, row, None)


def test_row_filters_tell_seed_copies_from_self_duplicates(tiny_model_dir: Path) -> None:
    from tuneloop.models import load_saved_tokenizer

    tokenizer = load_saved_tokenizer(tiny_model_dir)
    seed_text = "The quick brown fox jumps over the lazy dog and runs into the forest before sunset today"
    seeds = [_row("Describe the fox.", seed_text, source="seeds.jsonl", row=1)]
    new = [
        _row("Describe the fox.", seed_text, row=1),  # the teacher reproduced a seed
        _row("Describe the fox!", seed_text + " again", row=2),  # near the seed
        _row("What is the capital of France?", "Paris is the capital of France.", row=3),
        _row("what is the capital of  France?", "Paris is the capital of France.", row=4),  # same as row 3
        _row("Count.", " ".join(str(i) for i in range(400)), row=5),  # over max_seq_len tokens
    ]
    data = DataConfig.model_validate(
        {"max_seq_len": 64, "filters": {"toxicity": {"enabled": False}, "near_duplicates": {"threshold": 0.7}}}
    )
    kept, rejected = filter_rows(new, seeds, data, tokenizer)
    assert [sample.row for sample in kept] == [3]
    assert sorted((r.sample.row, r.reason) for r in rejected) == [
        (1, "duplicate_of_seed"),
        (2, "near_duplicate_of_seed"),
        (4, "duplicate"),
        (5, "too_long"),
    ]
    # rows kept in an earlier round count as "earlier" too: a copy of one is a plain duplicate
    again, rejected = filter_rows([_row("What is the capital of France?", "Paris is the capital of France.", row=6)],
                                  seeds + kept, data, tokenizer)  # fmt: skip
    assert again == [] and [r.reason for r in rejected] == ["duplicate"]


# -- seed files ---------------------------------------------------------------------------------------------------
def test_seed_files_of_every_shape(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"prompt": "Name a prime number."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
        {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
        {"instruction": "Count.", "instances": [{"input": "a b c", "output": "3"}]},  # Self-Instruct seed layout
        {"unrelated": 1},
        "not json",
    ]
    seeds = read_seed_tasks(write_jsonl(tmp_path / "seeds.jsonl", rows))
    assert [(s.task, s.output, s.line) for s in seeds.tasks] == [
        (Task("Translate to French.", "Good morning"), "Bonjour", 1),
        (Task("Name a prime number."), None, 2),
        (Task("Say hi."), None, 3),
        (Task("Add 2 and 3."), "5", 4),
        (Task("Count.", "a b c"), "3", 5),
    ]
    assert seeds.rows_read == 7 and seeds.unusable == {"missing_field": 1, "malformed": 1}
    text = tmp_path / "prompts.txt"
    text.write_text("What is 2 + 2?\n\nName a colour.\n")
    assert [s.task.instruction for s in read_seed_tasks(text).tasks] == ["What is 2 + 2?", "Name a colour."]


def test_seed_file_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--seed-data .*missing\.jsonl: no such file"):
        read_seed_tasks(tmp_path / "missing.jsonl")
    useless = write_jsonl(tmp_path / "useless.jsonl", [{"a": 1}, {"b": 2}])
    with pytest.raises(DataError, match=r"none of its 2 rows is a usable task \(first: .*useless\.jsonl:1: no instr"):
        read_seed_tasks(useless)


# -- the command's errors ------------------------------------------------------------------------------------------
def _synth(config: Path, teacher: str, seeds: Path, out: Path, *extra: str) -> tuple[int, dict]:
    result = runner.invoke(
        app,
        ["data", "synth", "-c", str(config), "--teacher", teacher, "--seed-data", str(seeds), "--out", str(out),
         "--json", *extra],
    )  # fmt: skip
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {"output": result.output}


def test_cli_errors_are_clear(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": "Name a prime number."}])
    config = write_config(tmp_path, tiny_model_dir, [{"path": str(seeds)}])
    out = tmp_path / "out.jsonl"
    code, answer = _synth(config, "base", seeds, out, "--num", "1")
    assert code == 2 and "--teacher 'base' is not a served model reference" in answer["error"]
    code, answer = _synth(config, "url:http://127.0.0.1:1/v1", seeds, out, "--num", "1")
    assert code == 2 and "names no model after `#`" in answer["error"]
    code, answer = _synth(config, "url:http://127.0.0.1:1/v1#m", tmp_path / "nope.jsonl", out, "--num", "1")
    assert code == 2 and "--seed-data" in answer["error"] and "nope.jsonl" in answer["error"]
    # nobody listens on the port: the first request fails, the run stops with the teacher named
    teacher = f"url:http://127.0.0.1:{free_port()}/v1#m"
    code, answer = _synth(config, teacher, seeds, out, "--num", "1", "--mode", "answer")
    assert code == 2 and f"the teacher {teacher} did not answer" in answer["error"] and "server is up" in answer["hint"]
    assert not out.exists()


# -- a real gateway as the teacher ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_teacher(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[str]:
    """`tuneloop serve` with SmolLM2 on the transformers engine; yields the `url:` reference of its base model."""
    root = tmp_path_factory.mktemp("synth-gateway")
    config = root / "serve.yaml"
    config.write_text(f"model: {{base: {smollm2_folder}}}\nserve: {{engine: transformers}}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one torch thread: more slow every request on a busy 2-core machine
        process, url = start_serve(config, root / "ws")
    wait_ready(url, process)
    yield f"url:{url}/v1#{smollm2_folder}"  # the gateway names its base model by the configured path
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


@pytest.mark.slow
def test_self_instruct_from_seed_tasks_with_provenance(
    smollm2_teacher: str, smollm2_folder: Path, shared_data: Path, tmp_path: Path, workspace: Path
) -> None:
    seed_file = shared_data / "self_instruct" / "seed_tasks.jsonl"
    if not seed_file.exists():
        pytest.skip(f"{seed_file} is missing")
    config = write_config(tmp_path, smollm2_folder, [{"path": str(seed_file)}], filters={"min_tokens": 4})
    out = tmp_path / "synth" / "self_instruct.jsonl"
    code, summary = _synth(
        config, smollm2_teacher, seed_file, out, "--num", "2", "--concurrency", "2",
        "--set", "data.synth.instructions_per_request=3",
        "--set", "data.synth.max_new_tokens=120",
        "--set", "data.synth.answer_max_new_tokens=24",
        "--set", "data.synth.drop_truncated_answers=false",
        "--set", "data.synth.max_rounds=3",
    )  # fmt: skip
    assert code == 0, summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(rows) == summary["written"] <= 2
    assert all(row["instruction"].strip() and row["output"].strip() and "input" in row for row in rows)
    seed_instructions = {json.loads(line)["instruction"] for line in seed_file.read_text().splitlines()}
    assert not {row["instruction"] for row in rows} & seed_instructions  # new tasks, not copies

    provenance = json.loads(Path(summary["provenance"]).read_text())
    assert Path(summary["provenance"]) == out.with_name("self_instruct.jsonl.provenance.json")
    assert provenance["mode"] == "self-instruct"
    assert provenance["teacher"] == {
        "ref": smollm2_teacher,
        "model": str(smollm2_folder),
        "base_url": smollm2_teacher.removeprefix("url:").split("#")[0],
    }
    template = provenance["templates"]["instructions"]
    assert "{examples}" in template["text"] and template["built_in"] is True
    assert template["sha256"] == __import__("hashlib").sha256(template["text"].encode()).hexdigest()
    assert provenance["sampling"]["temperature"] == 0.7 and provenance["sampling"]["instructions_per_request"] == 3
    assert provenance["seed_data"]["sha256"] == file_sha256(seed_file)
    assert provenance["seed_data"]["rows_usable"] == 175
    assert provenance["output"] == {"path": str(out), "sha256": file_sha256(out), "format": "alpaca", "rows": len(rows)}
    assert [entry["line"] for entry in provenance["rows"]] == list(range(1, len(rows) + 1))
    for entry in provenance["rows"]:  # each row names the 3 seed tasks its instruction-writing request showed
        assert len(entry["seed_lines"]) == 3 and all(1 <= line <= 175 for line in entry["seed_lines"])
    counts = provenance["counts"]
    assert counts["requests"]["sent"] >= 2 and counts["requests"]["failed"] == 0
    assert set(counts["dropped"]) >= {"similar_to_seed", "duplicate_of_seed", "near_duplicate_of_seed", "too_short"}
    assert provenance["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_answer_mode_drops_reproduced_seeds_and_prepare_reads_the_output(
    smollm2_teacher: str, smollm2_folder: Path, tmp_path: Path, workspace: Path
) -> None:
    prompts = ["What is the capital of France?", "Name three colors.", "Write one sentence about dogs."]
    unlabeled = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt} for prompt in prompts])
    config = write_config(tmp_path, smollm2_folder, [{"path": str(unlabeled)}])
    settings = ["--mode", "answer", "--concurrency", "1", "--set", "data.synth.answer_max_new_tokens=24",
                "--set", "data.synth.drop_truncated_answers=false", "--set", "data.synth.output_format=messages"]  # fmt: skip
    first = tmp_path / "answers.jsonl"
    code, summary = _synth(config, smollm2_teacher, unlabeled, first, "--num", "5", *settings)
    assert code == 0, summary
    answered = [json.loads(line) for line in first.read_text().splitlines()]
    assert summary["written"] == len(answered) == 3  # --num 5, but only 3 prompts
    assert [row["messages"][0]["content"] for row in answered] == prompts
    provenance = json.loads(Path(summary["provenance"]).read_text())
    assert [entry["seed_lines"] for entry in provenance["rows"]] == [[1], [2], [3]]
    assert "instructions" not in provenance["templates"]

    # Seeds whose answers are what the (greedy) teacher writes: those rows are dropped as copies of the seeds.
    labeled = write_jsonl(
        tmp_path / "labeled.jsonl",
        [{"prompt": row["messages"][0]["content"], "completion": row["messages"][1]["content"]} for row in answered[:2]]
        + [{"prompt": prompts[2], "completion": "Dogs are loyal."}],
    )
    second = tmp_path / "again.jsonl"
    code, summary = _synth(config, smollm2_teacher, labeled, second, "--num", "3", *settings)
    assert code == 0, summary
    assert summary["dropped"]["duplicate_of_seed"] == 2 and summary["written"] == 1

    # `tuneloop data prepare` takes the generated file as a source
    prepare_config = write_config(tmp_path, smollm2_folder, [{"path": str(first)}], val_fraction=0)
    result = runner.invoke(app, ["data", "prepare", "-c", str(prepare_config), "--json"])
    assert result.exit_code == 0, result.output
    prepared = json.loads(result.stdout)
    assert prepared["detected_formats"] == {str(first): "messages"} and prepared["rows_read"] == 3
    assert prepared["quarantined"] == 0
