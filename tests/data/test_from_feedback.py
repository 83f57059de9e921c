"""`tuneloop data from-feedback`: preference rows from gateway ratings joined to the traffic log, and from human
pairwise ratings of an evaluation.

First a real A/B gateway (`tuneloop serve` on 127.0.0.1: the tiny model and a random LoRA as the two variants of one
route, `serve.log_traffic: true`): prompts sent until both variants answered, ratings posted through /v1/feedback,
then the CLI. Then the pairing rules on constructed files: thumbs and stars, ties, merged identical answers, the cap,
the window, malformed lines, missing traffic, human votes."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.serve.servers import start_serve, wait_ready
from tests.tiny_model import save_random_lora
from tuneloop.artifacts.ratings import EvaluatedRow, HumanRating
from tuneloop.artifacts.traffic import FeedbackEntry, PreferenceProvenance, TrafficRecord
from tuneloop.cli import app
from tuneloop.data.feedback_pairs import FeedbackInputs, build_preference_rows, provenance_path, write_preference_rows
from tuneloop.errors import DataError
from tuneloop.keys import file_sha256
from tuneloop.workspace import EvalPaths, ServePaths

ROUTE = "assistant"
PROMPTS = {"thumbs": "Name a colour.", "stars": "Name a fruit.", "tie": "Name a city.", "unrated": "Name a tree."}


# -- through a real gateway ---------------------------------------------------------------------------------------------
@dataclass
class Served:
    workspace: Path
    control: str
    challenger: str
    answers: dict[str, dict[str, tuple[str, str]]]  # prompt name -> variant -> (response id, answer text)
    rated_at: tuple[float, float]


def ask_until_both_variants(client: httpx.Client, prompt: str, variants: tuple[str, str], stream: bool) -> dict:
    """Ask the route until each variant answered once: variant -> (response id, answer as the client read it)."""
    answers: dict[str, tuple[str, str]] = {}
    body = {"model": ROUTE, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "temperature": 0}
    for _ in range(40):
        if len(answers) == 2:
            return answers
        if stream:
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
            identifier, variant = events[0]["id"], events[0]["model"]
        else:
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            identifier, variant = answer.json()["id"], answer.json()["model"]
            text = answer.json()["choices"][0]["message"]["content"]
        answers.setdefault(variant, (identifier, text))
    pytest.fail(f"the route did not send {prompt!r} to both {variants}: {answers}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("from-feedback")
    control, challenger = str(tiny_model_dir), str(save_random_lora(tiny_model_dir, root / "challenger", r=8, alpha=64))
    serve = {
        "engine": "transformers",
        "precision": "fp32",
        "log_traffic": True,
        "routes": {ROUTE: {"variants": {control: 50, challenger: 50}, "sticky": False}},
    }
    config = root / "ab.yaml"
    config.write_text(yaml.safe_dump({"model": {"base": control}, "serve": serve}, sort_keys=False))
    workspace = root / "ws"
    process, url = start_serve(config, workspace)
    try:
        wait_ready(url, process)
        variants = (control, challenger)
        with httpx.Client(base_url=url, timeout=120) as client:
            answers = {
                name: ask_until_both_variants(client, PROMPTS[name], variants, stream=name == "stars")
                for name in ("thumbs", "stars", "tie")
            }
            unrated = client.post(
                "/v1/chat/completions",
                json={"model": ROUTE, "messages": [{"role": "user", "content": PROMPTS["unrated"]}], "max_tokens": 4},
            )
            assert unrated.status_code == 200
            ratings = {
                "thumbs": {challenger: "up", control: "down"},
                "stars": {control: 5, challenger: "3"},
                "tie": {control: "up", challenger: "thumbs_up"},
            }
            started = datetime.now(UTC).timestamp()
            for name, by_variant in ratings.items():
                for variant, rating in by_variant.items():
                    body = {"response_id": answers[name][variant][0], "rating": rating}
                    assert client.post("/v1/feedback", json=body).status_code == 200
            finished = datetime.now(UTC).timestamp()
        yield Served(workspace, control, challenger, answers, (started, finished))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow
def test_ab_feedback_becomes_preference_rows_through_the_cli(served: Served, tmp_path: Path) -> None:
    for name in ("thumbs", "stars"):  # otherwise no pair can be made: the random adapter must change the answers
        assert served.answers[name][served.control][1] != served.answers[name][served.challenger][1]
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(
        app, ["data", "from-feedback", "--workspace", str(served.workspace), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {row["prompt"][0]["content"]: row for row in rows}
    assert set(by_prompt) == {PROMPTS["thumbs"], PROMPTS["stars"]}  # the tie made no row
    expectations = {"thumbs": (served.challenger, served.control), "stars": (served.control, served.challenger)}
    for name, (winner, loser) in expectations.items():
        row = by_prompt[PROMPTS[name]]
        assert row["prompt"] == [{"role": "user", "content": PROMPTS[name]}]
        assert row["chosen"] == [{"role": "assistant", "content": served.answers[name][winner][1]}]
        assert row["rejected"] == [{"role": "assistant", "content": served.answers[name][loser][1]}]
        assert (row["chosen_variant"], row["rejected_variant"]) == (winner, loser)
        assert row["chosen_response_id"] == served.answers[name][winner][0]

    provenance = PreferenceProvenance.load(provenance_path(out))
    assert provenance.model_dump(mode="json") == {key: value for key, value in summary.items() if key != "out"}
    assert provenance.rows == 2 and provenance.variants == sorted([served.control, served.challenger])
    counts, dropped = provenance.counts, provenance.dropped
    assert (counts["ratings_read"], counts["ratings_in_window"], counts["ratings_joined"]) == (6, 6, 6)
    assert (counts["prompts"], counts["pairs"]) == (3, 2)
    assert dropped["pairs_tied"] == 1 and dropped["prompts_without_pair"] == 1
    assert dropped["responses_unrated"] >= 1  # the unrated prompt, and repeats while waiting for both variants
    assert "ratings_missing_traffic" not in dropped
    window = provenance.window
    first, last = (
        datetime.fromisoformat(moment or "").timestamp() for moment in (window.first_rating, window.last_rating)
    )
    assert served.rated_at[0] - 1 <= first <= last <= served.rated_at[1] + 1
    serve_paths = ServePaths(served.workspace / "serve")
    hashed = {(source.kind, Path(source.path)): source.sha256 for source in provenance.sources}
    assert hashed == {
        ("feedback", serve_paths.feedback): file_sha256(serve_paths.feedback),
        ("traffic", serve_paths.traffic): file_sha256(serve_paths.traffic),
    }


@pytest.mark.slow
def test_an_empty_window_is_a_clear_error(served: Served, tmp_path: Path) -> None:
    options = ["--workspace", str(served.workspace), "--out", str(tmp_path / "p.jsonl"), "--until", "2020-01-01"]
    result = CliRunner().invoke(app, ["data", "from-feedback", *options])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "no ratings in the window beginning .. 2020-01-01T00:00:00+00:00 (6 read" in said, said
    assert not (tmp_path / "p.jsonl").exists()


# -- the rules, on constructed files ------------------------------------------------------------------------------------
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def chat(prompt: str, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": prompt}]


class Logs:
    """A feedback file and a traffic log written line by line, as the gateway writes them."""

    def __init__(self, folder: Path) -> None:
        self.feedback = folder / "feedback.jsonl"
        self.traffic = folder / "traffic.jsonl"
        self.count = 0

    def served(self, messages: list[dict[str, Any]] | None, answer: str, variant: str, **extra: Any) -> str:
        self.count += 1
        response_id = f"chatcmpl-{self.count:03d}"
        record = TrafficRecord(
            response_id=response_id,
            time=T0 + self.count,
            model=ROUTE,
            variant=variant,
            served=variant,
            endpoint="chat.completions" if messages is not None else "completions",
            messages=messages,
            prompt=None if messages is not None else "text prompt",
            answer=answer,
            **extra,
        )
        with self.traffic.open("a") as handle:
            handle.write(record.model_dump_json() + "\n")
        return response_id

    def rate(self, response_id: str, rating: str | int, at: float = T0 + 1000) -> None:
        positive = rating == "up" if isinstance(rating, str) else rating >= 4
        entry = FeedbackEntry(time=at, response_id=response_id, model=ROUTE, rating=rating, positive=positive)
        with self.feedback.open("a") as handle:
            handle.write(entry.model_dump_json() + "\n")

    def inputs(self, **options: Any) -> FeedbackInputs:
        return FeedbackInputs(feedback=[self.feedback], traffic=[self.traffic], **options)


@pytest.fixture
def logs(tmp_path: Path) -> Logs:
    return Logs(tmp_path)


def pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in rows]


def test_thumbs_stars_and_ties(logs: Logs) -> None:
    logs.rate(logs.served(chat("thumbs"), "good", "a"), "up")
    logs.rate(logs.served(chat("thumbs"), "bad", "b"), "down")
    logs.rate(logs.served(chat("stars"), "four", "a"), 4)
    logs.rate(logs.served(chat("stars"), "five", "b"), 5)  # both positive: the higher one is chosen
    logs.rate(logs.served(chat("tie"), "up", "a"), "up")
    logs.rate(logs.served(chat("tie"), "five", "b"), 5)  # up and 5 stars are the same score: a tie
    logs.rate(logs.served(chat("low"), "two", "a"), 2)
    logs.rate(logs.served(chat("low"), "one", "b"), 1)  # both negative: still an order
    result = build_preference_rows(logs.inputs())
    assert pairs(result.rows) == [("good", "bad"), ("five", "four"), ("two", "one")]
    assert [(row["chosen_score"], row["rejected_score"]) for row in result.rows] == [(1, 0), (1, 0.75), (0.25, 0)]
    assert result.provenance.dropped == {"pairs_tied": 1, "prompts_without_pair": 1}
    assert result.provenance.counts["prompts"] == 4 and result.provenance.variants == ["a", "b"]


def test_identical_answers_and_prompts_are_merged(logs: Logs) -> None:
    first = logs.served([{"role": "system", "content": "Be brief."}, *chat("Name  a colour.")], "Red.", "a")
    again = logs.served([{"role": "System", "content": " Be brief. "}, *chat("Name a colour.")], "Red.", "b")
    other = logs.served([{"role": "system", "content": "Be brief."}, *chat("Name a colour.")], "Blue.", "b")
    for response_id, rating in ((first, "up"), (again, "up"), (again, "down"), (other, "down")):
        logs.rate(response_id, rating)
    result = build_preference_rows(logs.inputs())
    # "Red." is one answer rated up, up, down (2/3); "Blue." down: one pair, the prompt as first asked.
    assert pairs(result.rows) == [("Red.", "Blue.")]
    row = result.rows[0]
    assert row["prompt"][1] == {"role": "user", "content": "Name  a colour."}
    assert row["chosen_score"] == pytest.approx(2 / 3, abs=1e-4) and row["chosen_response_id"] == first
    assert result.provenance.counts["prompts"] == 1 and result.provenance.counts["ratings_joined"] == 4


def test_pairs_per_prompt_are_capped_widest_gap_first(logs: Logs) -> None:
    for answer, stars in (("three", 3), ("five", 5), ("one", 1), ("four", 4)):
        logs.rate(logs.served(chat("q"), answer, "a"), stars)
    result = build_preference_rows(logs.inputs(max_pairs_per_prompt=3))
    assert pairs(result.rows) == [("five", "one"), ("four", "one"), ("three", "one")]
    assert result.provenance.dropped == {"pairs_over_cap": 3}


def test_same_inputs_same_bytes(logs: Logs, tmp_path: Path) -> None:
    for index in range(6):
        logs.rate(logs.served(chat(f"q{index % 2}"), f"answer {index}", "ab"[index % 2]), ("up", "down", 3)[index % 3])
    outputs = []
    for name in ("one.jsonl", "two.jsonl"):
        write_preference_rows(build_preference_rows(logs.inputs()), tmp_path / name)
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 6  # 3 answers per prompt, all scored apart


def test_window_selects_ratings_by_when_they_were_given(logs: Logs) -> None:
    early, late = datetime(2027, 1, 15, 9, tzinfo=UTC).timestamp(), datetime(2027, 1, 16, 9, tzinfo=UTC).timestamp()
    for prompt, moment in (("early", early), ("late", late)):
        logs.rate(logs.served(chat(prompt), "yes", "a"), "up", at=moment)
        logs.rate(logs.served(chat(prompt), "no", "b"), "down", at=moment)
    since = datetime(2027, 1, 16, tzinfo=UTC)
    result = build_preference_rows(logs.inputs(since=since))
    assert [row["prompt"][0]["content"] for row in result.rows] == ["late"]
    window = result.provenance.window
    assert (window.since, window.until) == ("2027-01-16T00:00:00+00:00", None)
    assert window.first_rating == window.last_rating == "2027-01-16T09:00:00+00:00"
    assert result.provenance.dropped["ratings_outside_window"] == 2
    with pytest.raises(DataError, match=r"no ratings in the window 2027-01-17T00:00:00\+00:00 .. now \(4 read"):
        build_preference_rows(logs.inputs(since=datetime(2027, 1, 17, tzinfo=UTC)))


def test_malformed_lines_are_skipped_counted_and_named(logs: Logs) -> None:
    logs.rate(logs.served(chat("q"), "yes", "a"), "up")
    with logs.traffic.open("a") as handle:
        handle.write('{"response_id": "chatcmpl-broken", "answer": \n')  # a writer killed mid-line
    logs.rate(logs.served(chat("q"), "no", "b"), "down")
    with logs.feedback.open("a") as handle:
        handle.write('{"time": 1, "response_id": "x", "rating": "up"}\n')  # no model, no positive
    result = build_preference_rows(logs.inputs())
    assert pairs(result.rows) == [("yes", "no")]
    assert result.provenance.counts["malformed_lines"] == 2
    assert [line.split(": ")[0] for line in result.provenance.malformed_lines] == [
        f"{logs.feedback}:3",
        f"{logs.traffic}:2",
    ]
    assert {(source.kind, source.lines, source.malformed) for source in result.provenance.sources} == {
        ("feedback", 3, 1),
        ("traffic", 3, 1),
    }


def test_what_cannot_be_joined_or_used_is_counted(logs: Logs) -> None:
    logs.rate(logs.served(chat("q"), "yes", "a"), "up")
    logs.rate(logs.served(chat("q"), "no", "b"), "down")
    logs.rate("chatcmpl-served-before-logging", "up")
    logs.rate(logs.served(None, "a completion", "a"), "up")  # /v1/completions: a text prompt
    logs.rate(logs.served(chat("q"), "first of two", "a", other_choices=["second"]), "down")
    logs.served(chat("q"), "never rated", "a")
    result = build_preference_rows(logs.inputs())
    assert pairs(result.rows) == [("yes", "no")]
    assert result.provenance.dropped == {
        "ratings_missing_traffic": 1,
        "responses_not_chat": 1,
        "responses_several_choices": 1,
        "responses_unrated": 1,
    }


def test_no_pair_and_no_traffic_log_are_clear_errors(logs: Logs, tmp_path: Path) -> None:
    logs.rate(logs.served(chat("q"), "only answer", "a"), "up")
    with pytest.raises(DataError, match=r"no preference pairs: 1 ratings in the window.*prompts_without_pair 1"):
        build_preference_rows(logs.inputs())
    workspace = tmp_path / "ws"
    ServePaths(workspace / "serve").root.mkdir(parents=True)
    ServePaths(workspace / "serve").feedback.write_bytes(logs.feedback.read_bytes())
    result = CliRunner().invoke(
        app, ["data", "from-feedback", "--workspace", str(workspace), "--out", str(tmp_path / "p.jsonl")]
    )
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "serve.log_traffic: true" in said, said


def test_human_pairwise_ratings_become_rows_by_majority(tmp_path: Path) -> None:
    folder = EvalPaths(tmp_path / "eval" / "20270115-base-tuned")
    folder.root.mkdir(parents=True)
    rows = [
        EvaluatedRow(id="r0000", prompt="Q0", messages=chat("Q0"), outputs={"base": "b0", "tuned": "t0"}),
        EvaluatedRow(id="r0001", prompt="Q1", messages=chat("Q1"), outputs={"base": "b1", "tuned": "t1"}),
        EvaluatedRow(id="r0002", prompt="Q2", outputs={"base": "b2", "tuned": "t2"}),
    ]
    folder.outputs.write_text("".join(row.model_dump_json() + "\n" for row in rows))
    votes = [("r0000", "tuned"), ("r0000", "tuned"), ("r0000", "base"), ("r0001", "tie"), ("r0002", "base")]
    votes += [("r0001", "base"), ("r0001", "tuned")]  # one each and a tie: no majority
    ratings = [
        HumanRating(
            time=T0 + index,
            rater=f"rater{index}",
            row_id=row_id,
            mode="pairwise",
            answers={"A": "base", "B": "tuned"},
            preference=preference,
        )
        for index, (row_id, preference) in enumerate(votes)
    ]
    ratings.append(HumanRating(time=T0, rater="x", row_id="r0000", mode="single", answers={"A": "base"}))
    folder.ratings.write_text("".join(rating.model_dump_json() + "\n" for rating in ratings))
    result = build_preference_rows(FeedbackInputs(ratings=[folder.ratings]))
    assert pairs(result.rows) == [("t0", "b0"), ("b2", "t2")]
    assert result.rows[0]["votes"] == {"tuned": 2, "base": 1} and result.rows[0]["prompt"] == chat("Q0")
    assert result.rows[1]["prompt"] == chat("Q2")  # no messages kept: the prompt text as the user's turn
    assert result.provenance.dropped == {"human_ratings_not_pairwise": 1, "human_ties": 1}
    assert {source.kind for source in result.provenance.sources} == {"ratings", "outputs"}


def test_ratings_kept_in_redis_are_named_with_how_to_export_them(tmp_path: Path) -> None:
    config = tmp_path / "replicas.yaml"
    config.write_text(yaml.safe_dump({"serve": {"state_url": "redis://10.0.0.5:6379/0"}}))
    options = ["-c", str(config), "--workspace", str(tmp_path / "ws"), "--out", str(tmp_path / "p.jsonl")]
    result = CliRunner().invoke(app, ["data", "from-feedback", *options])
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "keep their ratings in Redis" in said, said
    assert "LRANGE tuneloop:feedback:entries" in said
