"""One full turn of the data flywheel at tiny scale, through the CLI and a real gateway (docs/flywheel.md):

SFT champion registered and promoted → `tuneloop serve` with `serve.log_traffic` and an A/B route (champion vs the
base) → chat requests over HTTP → ratings on /v1/feedback (the champion's answers up, the base's down) →
`tuneloop data from-feedback` → `tuneloop train` with `train.method: dpo` on the champion → `tuneloop eval` against
the champion with gates → `tuneloop registry register` + `promote` → `NAME@champion` is the DPO version.

The tiny model's answers are noise, so this checks the mechanics (every step's artifact and what it records), not
whether the new champion is better: tests/train/test_preference.py checks that DPO moves the margin."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import write_jsonl
from tests.serve.servers import start_serve, wait_ready
from tuneloop.artifacts.traffic import PreferenceProvenance, TrafficRecord
from tuneloop.artifacts.training import TrainResult
from tuneloop.cli import app
from tuneloop.data.feedback_pairs import provenance_path
from tuneloop.workspace import EvalPaths, Workspace

pytestmark = pytest.mark.slow

NAME = "tiny-chat"
CHAMPION = f"{NAME}@champion"
ROUTE = "assistant"
PROMPTS = [f"Say the number {number}" for number in (3, 14, 27, 41, 58, 72)]

runner = CliRunner()


def cli(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_config(path: Path, base: Path, source: Path, eval_data: Path, **train: Any) -> Path:
    """One config per step of the turn; they differ in `data.sources` and `train` only."""
    config = {
        "project": {"name": "flywheel"},
        "model": {"base": str(base)},
        "data": {
            "sources": [{"path": str(source)}],
            "max_seq_len": 64,
            "val_fraction": 0.0,
            "filters": {"near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}, "min_tokens": 1},
        },
        "train": {
            "max_steps": 8,
            "batch_size": 4,
            "learning_rate": 0.003,
            "logging_every": 2,
            "system_metrics": False,
            "lora": {"r": 8, "alpha": 16},
            **train,
        },
        "eval": {
            "engine": "inprocess",
            "data": {"path": str(eval_data)},
            "metrics": ["perplexity", "exact_match"],
            "max_new_tokens": 8,
            # Noise can neither pass a quality bar nor be promised to fail one: a gate against the champion that
            # any model meets, so the turn's promotion goes through the gate check rather than around it.
            "gates": {"perplexity_improvement": -1000.0},
        },
        "serve": {
            "engine": "transformers",
            "precision": "fp32",
            "log_traffic": True,
            "routes": {ROUTE: {"variants": {CHAMPION: 50, str(base): 50}, "sticky": False}},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ask_both_variants(client: httpx.Client, prompt: str) -> dict[str, tuple[str, str]]:
    """Ask the route until each of its two variants answered the prompt: variant -> (response id, answer).
    Sampled, seeded per request: greedy, the tiny model and a few-step adapter on it both answer with newlines, and
    identical answers make no pair."""
    answers: dict[str, tuple[str, str]] = {}
    body = {"model": ROUTE, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 1.0}
    for attempt in range(40):
        response = client.post("/v1/chat/completions", json={**body, "seed": attempt})
        assert response.status_code == 200, response.text
        answer = response.json()
        # The variant that answered: the response's `model` and the x-tuneloop-variant header say the same.
        assert response.headers["x-tuneloop-variant"] == answer["model"]
        answers.setdefault(answer["model"], (answer["id"], answer["choices"][0]["message"]["content"]))
        if len(answers) == 2:
            return answers
    pytest.fail(f"the route sent {prompt!r} to one variant only: {answers}")


def test_one_turn_of_the_flywheel(tmp_path: Path, tiny_model_dir: Path, workspace: Path) -> None:
    numbers = [n for n in range(100) if f"Say the number {n}" not in PROMPTS]
    sft_rows = [{"instruction": f"Say the number {n}", "output": f"The number is {n}."} for n in numbers[:48]]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    eval_rows = [{"instruction": f"Say the number {n}", "output": f"The number is {n}."} for n in numbers[80:88]]
    eval_data = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    pairs = tmp_path / "pairs.jsonl"
    base = str(tiny_model_dir)

    # 0. The current champion: an SFT adapter, registered and promoted.
    sft_config = write_config(tmp_path / "sft.yaml", tiny_model_dir, sft_data, eval_data, method="lora")
    sft = cli("train", "-c", str(sft_config))
    assert cli("registry", "register", sft["run_id"], "--name", NAME, "-c", str(sft_config))["version"] == 1
    assert cli("registry", "promote", NAME, "1", "-c", str(sft_config))["champion"] == 1

    # 1. Serve the champion and the base as the two variants of one route, logging traffic; rate their answers.
    process, url = start_serve(sft_config, workspace)
    try:
        wait_ready(url, process)
        with httpx.Client(base_url=url, timeout=120) as client:
            answers = {prompt: ask_both_variants(client, prompt) for prompt in PROMPTS}
            rated_from = time.time()
            for by_variant in answers.values():
                for variant, (response_id, _) in by_variant.items():
                    rating = "up" if variant == CHAMPION else "down"
                    rated = client.post("/v1/feedback", json={"response_id": response_id, "rating": rating})
                    assert rated.status_code == 200, rated.text
            rated_until = time.time()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert {variant for by_variant in answers.values() for variant in by_variant} == {CHAMPION, base}
    place = Workspace(workspace)
    logged = [TrafficRecord.model_validate_json(line) for line in place.serve.traffic.open()]
    assert {record.response_id for record in logged} >= {rid for v in answers.values() for rid, _ in v.values()}
    assert all(record.model == ROUTE and record.variant in (CHAMPION, base) for record in logged)
    # A prompt both variants answered alike makes no pair (identical answers are one candidate).
    differing = [prompt for prompt, by_variant in answers.items() if by_variant[CHAMPION][1] != by_variant[base][1]]
    assert len(differing) >= 2, answers

    # 2. Ratings joined to the traffic log → preference rows, with provenance beside them.
    summary = cli("data", "from-feedback", "--out", str(pairs))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == summary["rows"] == len(differing)
    for row in rows:
        prompt = row["prompt"][0]["content"]
        assert prompt in differing
        assert (row["chosen_variant"], row["rejected_variant"]) == (CHAMPION, base)
        assert row["chosen"] == [{"role": "assistant", "content": answers[prompt][CHAMPION][1]}]
        assert row["rejected"] == [{"role": "assistant", "content": answers[prompt][base][1]}]
    provenance = PreferenceProvenance.load(provenance_path(pairs))
    assert provenance.rows == len(rows) and provenance.variants == sorted([CHAMPION, base])
    assert provenance.counts["ratings_read"] == provenance.counts["ratings_joined"] == 2 * len(PROMPTS)
    window = provenance.window
    first, last = (datetime_seconds(moment) for moment in (window.first_rating, window.last_rating))
    assert rated_from - 1 <= first <= last <= rated_until + 1
    assert {source.kind for source in provenance.sources} == {"feedback", "traffic"}

    # 3. DPO on those rows, continuing the champion's adapter (its frozen copy is the reference).
    dpo_config = write_config(
        tmp_path / "dpo.yaml",
        tiny_model_dir,
        pairs,
        eval_data,
        method="dpo",
        max_steps=4,
        batch_size=2,
        preference={"parent": CHAMPION, "beta": 0.1},
    )
    dpo = cli("train", "-c", str(dpo_config))
    assert dpo["method"] == "dpo" and dpo["steps"] == 4
    result = TrainResult.load(place.run(dpo["run_id"]).summary)
    assert result.parent is not None
    assert result.parent["run_id"] == sft["run_id"] and result.parent["version"] == f"{NAME}/1"
    assert result.preference is not None and result.preference["reference_model"] == "parent adapter"

    # 4. Evaluate the DPO run against the champion it would replace; the gate compares the two.
    report = cli("eval", "-c", str(dpo_config), "--model", dpo["run_id"], "--compare", CHAMPION)
    assert list(report["models"].values()) == [dpo["run_id"], CHAMPION]
    assert report["gates"] == {"perplexity_improvement": "pass"} and report["passed"] is True
    assert EvalPaths(Path(report["dir"])).metrics.exists() and Path(report["report"]).exists()

    # 5. Register (lineage: parent, feedback window, evaluation) and promote.
    registered = cli("registry", "register", dpo["run_id"], "--name", NAME, "-c", str(dpo_config))
    assert registered["version"] == 2
    lineage = json.loads(place.version(NAME, 2).lineage.read_text())
    assert lineage["method"] == "dpo" and lineage["data"]["kind"] == "preference"
    assert lineage["parent"]["version"] == f"{NAME}/1" and lineage["parent"]["run_id"] == sft["run_id"]
    recorded = lineage["data"]["provenance"][str(pairs)]
    assert recorded["window"] == provenance.window.model_dump(mode="json") and recorded["rows"] == len(rows)
    assert lineage["evaluation"]["passed"] is True
    promoted = cli("registry", "promote", NAME, "2", "-c", str(dpo_config))
    assert (promoted["champion"], promoted["previous"]) == (2, 1)
    champion = cli("registry", "show", CHAMPION, "-c", str(dpo_config))
    assert champion["version"] == 2 and champion["run_id"] == dpo["run_id"]


def datetime_seconds(moment: str | None) -> float:
    assert moment is not None
    return datetime.fromisoformat(moment).timestamp()
