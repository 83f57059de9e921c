"""The LLM judge's mechanics without a model: verdict and rating parsing, the two-order consistency rule, and the
metrics computed from judge.jsonl-shaped records (hand-made verdicts, a malformed reply among them)."""

from __future__ import annotations

from typing import Any

import pytest

from tuneloop.evaluate.judge import (
    JudgedRow,
    combine_orders,
    grade_messages,
    judge_metrics,
    pair_messages,
    parse_pair_verdict,
    parse_rating,
)
from tuneloop.stats import wilson_interval


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Assistant A is accurate and concise. [[A]]", "A"),
        ("B answers the question; A does not.\n\nFinal verdict: [[B]]", "B"),
        ("Both are equally good. [[C]]", "C"),
        ("[[ b ]]", "B"),
        # the final verdict is the last one: an explanation may quote the other label first
        ("At first [[A]] looked better, but on reflection [[B]]", "B"),
        # the instructions' format line repeated back is not a verdict
        ('Format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.', None),
        ('I output "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie. [[A]]', "A"),
        ("End your reply with your final verdict: [[A]], [[B]] or [[C]].", None),  # the reminder repeated
        ("I think assistant A is better.", None),
        ("[A]", None),
        ("", None),
    ],
)
def test_pair_verdicts_are_parsed(reply: str, verdict: str | None) -> None:
    assert parse_pair_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("The answer is correct and complete. Rating: [[4]]", 4.0),
        ("Rating: [[5]]", 5.0),
        ("Rating: [[3.5]]", 3.5),
        ("Rating: [[2/5]]", 2.0),
        ("Some text [[1]] then the final Rating: [[2]]", 2.0),
        ("Rating: 3", 3.0),  # backup format without brackets
        ("Rating: [[9]]", None),  # outside 1-5
        ("Rating: [[0]]", None),
        ("This answer is good.", None),
        ("[[A]]", None),
    ],
)
def test_ratings_are_parsed(reply: str, rating: float | None) -> None:
    assert parse_rating(reply) == rating


@pytest.mark.parametrize(
    ("first", "second", "outcome"),
    [
        ("A", "B", "win"),  # primary preferred in both orders
        ("B", "A", "loss"),
        ("C", "C", "tie"),
        ("A", "A", "tie"),  # position bias: "A" whatever A is -> inconsistent -> tie
        ("B", "B", "tie"),
        ("A", "C", "tie"),  # preferred in one order only
        ("C", "B", "tie"),
        ("A", None, "unparsed"),
        (None, "B", "unparsed"),
    ],
)
def test_a_win_needs_both_orders(first: Any, second: Any, outcome: str) -> None:
    assert combine_orders(first, second) == outcome


def _pair(row: str, order: int, verdict: str | None, other: str = "base") -> dict[str, Any]:
    a, b = ("tuned", other) if order == 1 else (other, "tuned")
    return {
        "kind": "pairwise",
        "id": row,
        "models": ["tuned", other],
        "order": order,
        "a": a,
        "b": b,
        "verdict": verdict,
        "reply": f"... [[{verdict}]]" if verdict else "no idea",
    }


def _grade(row: str, model: str, dimension: str, rating: float | None) -> dict[str, Any]:
    return {
        "kind": "grade",
        "id": row,
        "model": model,
        "dimension": dimension,
        "rating": rating,
        "reply": f"Rating: [[{rating}]]" if rating else "garbage",
    }


def test_metrics_from_hand_made_verdicts() -> None:
    records = [
        *(_pair("r0", 1, "A"), _pair("r0", 2, "B")),  # tuned wins
        *(_pair("r1", 1, "A"), _pair("r1", 2, "A")),  # inconsistent: tie
        *(_pair("r2", 1, "B"), _pair("r2", 2, "A")),  # base wins
        *(_pair("r3", 1, "A"), _pair("r3", 2, "B")),  # tuned wins
        *(_pair("r4", 1, None), _pair("r4", 2, "B")),  # malformed reply: row left out
        _grade("r0", "tuned", "helpfulness", 5),
        _grade("r1", "tuned", "helpfulness", 3),
        _grade("r0", "tuned", "safety", 4),
        _grade("r1", "tuned", "safety", None),  # malformed
        _grade("r0", "base", "helpfulness", 2),
        _grade("r1", "base", "helpfulness", 1),
    ]
    metrics = judge_metrics(records, "tuned", ["base"], ["helpfulness", "safety"])
    tuned, base = metrics["tuned"], metrics["base"]
    assert (tuned["judge_wins"], tuned["judge_ties"], tuned["judge_losses"]) == (2, 1, 1)
    assert (base["judge_wins"], base["judge_ties"], base["judge_losses"]) == (1, 1, 2)
    assert tuned["judge_win_rate"] == pytest.approx(2.5 / 4)
    assert base["judge_win_rate"] == pytest.approx(1.5 / 4)
    low, high = wilson_interval(2.5 / 4, 4)
    assert (tuned["judge_win_rate_ci_low"], tuned["judge_win_rate_ci_high"]) == pytest.approx((low, high))
    assert tuned["judge_helpfulness_mean"] == pytest.approx(4.0)
    assert tuned["judge_safety_mean"] == pytest.approx(4.0)
    assert tuned["judge_score_mean"] == pytest.approx(4.0)  # mean of the parsed grades 5, 3, 4
    assert base["judge_helpfulness_mean"] == pytest.approx(1.5) and "judge_safety_mean" not in base
    # unparsed replies: tuned took part in 10 pairwise calls + 4 grades, one of each malformed
    assert tuned["judge_unparsed"] == 2 and tuned["judge_unparsed_rate"] == pytest.approx(2 / 14)
    assert base["judge_unparsed"] == 1 and base["judge_unparsed_rate"] == pytest.approx(1 / 12)


def test_all_replies_malformed_gives_no_win_rate_but_counts_them() -> None:
    records = [_pair("r0", 1, None), _pair("r0", 2, None), _grade("r0", "tuned", "safety", None)]
    tuned = judge_metrics(records, "tuned", ["base"], ["safety"])["tuned"]
    assert tuned == {
        "judge_wins": 0,
        "judge_ties": 0,
        "judge_losses": 0,
        "judge_unparsed": 3,
        "judge_unparsed_rate": 1.0,
    }


def test_the_primary_win_rate_is_against_the_baseline_and_others_against_the_primary() -> None:
    records = [
        *(_pair("r0", 1, "A"), _pair("r0", 2, "B")),  # tuned beats base
        *(_pair("r0", 1, "B", other="gpt"), _pair("r0", 2, "A", other="gpt")),  # gpt beats tuned
    ]
    metrics = judge_metrics(records, "tuned", ["base", "gpt"], [])
    assert metrics["tuned"]["judge_win_rate"] == 1.0  # vs base, the first compared model
    assert metrics["base"]["judge_win_rate"] == 0.0 and metrics["gpt"]["judge_win_rate"] == 1.0


def test_prompts_show_the_reference_when_there_is_one_and_swap_answers() -> None:
    row = JudgedRow("r0", "What is 2+2?", "4")
    first = pair_messages(row, "four", "five")[-1]["content"]
    second = pair_messages(row, "five", "four")[-1]["content"]
    assert "[The Start of Reference Answer]\n4\n" in first
    assert first.index("four") < first.index("five") and second.index("five") < second.index("four")
    assert "[[A]]" in pair_messages(row, "x", "y")[0]["content"]
    grade = grade_messages(JudgedRow("r1", "Hi", None), "Hello!", "instruction_following", "follows every instruction")
    assert "Reference" not in grade[-1]["content"] and "instruction following" in grade[0]["content"]
    assert "Rating: [[N]]" in grade[0]["content"]


def test_a_failed_judge_request_is_kept_as_an_answer_with_its_error() -> None:
    """What the judge relies on: with keep_failures a request that fails (nothing listens on the port) comes back as an
    answer carrying its error, in order, instead of stopping the evaluation; without it, it raises."""
    from tuneloop.chat_client import ChatEndpoint, chat_generate
    from tuneloop.errors import TuneloopError
    from tuneloop.net import free_port

    closed = ChatEndpoint(f"http://127.0.0.1:{free_port()}/v1", "judge")
    prompts = [[{"role": "user", "content": "hello"}]] * 2
    answers = chat_generate(closed, prompts, 4, max_retries=0, keep_failures=True)
    assert [a.text for a in answers] == ["", ""] and all("failed on prompt" in (a.error or "") for a in answers)
    assert "prompt 1" in (answers[1].error or "")
    with pytest.raises(TuneloopError, match="failed on prompt"):
        chat_generate(closed, prompts, 4, max_retries=0)
