"""LLM-as-judge, MT-Bench style (Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena"; the
prompt structure and verdict formats follow FastChat's `llm_judge` prompts `pair-v2`, `pair-math-v1`, `single-v1`).

- Pairwise: the evaluated (primary) model against each compared model, every row judged twice, once with the primary
  as assistant A and once as assistant B. The judge ends with `[[A]]`, `[[B]]` or `[[C]]` (tie). Consistency rule: a
  model wins a row only when both orders prefer it; any other pair of parsed verdicts (one order prefers A's model,
  the other B's, or one says tie) is a tie. A row where either order has no verdict is `unparsed` and excluded.
- Grading: every judged model's answer rated 1-5 on each dimension of `eval.rubric` (one call per row, model and
  dimension), `Rating: [[N]]`. The reference answer is shown to the judge when the row has one.

A reply without a verdict (or a failed request) counts in `judge_unparsed` and is left out of the other metrics; it
never stops the evaluation. Every reply is kept in full in judge.jsonl.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console

from tuneloop.chat_client import ChatAnswer, ChatEndpoint, Messages, chat_generate
from tuneloop.stats import wilson_interval

Verdict = Literal["A", "B", "C"]
Outcome = Literal["win", "loss", "tie", "unparsed"]  # for the primary model

_VERDICT_FORMAT = '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie'
_PAIR_SYSTEM = (
    "Act as an impartial judge. Compare the answers two AI assistants gave to the user question below and decide "
    "which one follows the user's instructions and answers the question better, considering helpfulness, relevance, "
    "accuracy, depth and level of detail.{reference} Start with a short explanation comparing the two answers. The "
    "order in which the answers are shown, their length and the assistants' names must not influence you; be as "
    "objective as possible. After the explanation, give your final verdict in exactly this format: "
    f"{_VERDICT_FORMAT}."
)
_GRADE_SYSTEM = (
    "Act as an impartial judge. Rate the answer an AI assistant gave to the user question below on one dimension "
    "only: {dimension}. A rating of 5 means: {meaning} A rating of 1 means the answer fails at this entirely.{reference}"
    " Start with a short explanation, be as objective as possible, then rate the answer from 1 to 5 in exactly this "
    'format: "Rating: [[N]]", where N is 1, 2, 3, 4 or 5.'
)
_REFERENCE_NOTE = " A reference answer is given: compare with it and point out mistakes."

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
# A judge that repeats the instructions' format line names all three verdicts; that line is not a verdict.
_FORMAT_ECHO = re.compile(
    r"\[\[\s*A\s*\]\]\W*\s*if\s+assistant\s+A\s+is\s+better.*?\[\[\s*C\s*\]\]\W*\s*for\s+a\s+tie"
    r"|\[\[A\]\],?\s*\[\[B\]\],?\s*(?:or\s+)?\[\[C\]\]",
    re.I | re.S,
)
# Repeated after the answers: small judges follow the last instruction they read, and strong ones lose nothing.
_PAIR_REMINDER = "End your reply with your final verdict: [[A]], [[B]] or [[C]]."
_GRADE_REMINDER = "End your reply with your rating: Rating: [[N]], N from 1 to 5."
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*5\s*)?\]\]")
_RATING_BACKUP = re.compile(r"\brating\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*\]?", re.IGNORECASE)


def parse_pair_verdict(reply: str) -> Verdict | None:
    """The judge's final `[[A]]`/`[[B]]`/`[[C]]` (the last one: verdicts come after the explanation), or None."""
    found = _VERDICT.findall(_FORMAT_ECHO.sub(" ", reply))
    return found[-1].upper() if found else None  # type: ignore[return-value]


def parse_rating(reply: str) -> float | None:
    """The last `[[N]]` (or, failing that, `Rating: N`) with N within 1-5, or None."""
    matches = _RATING.findall(reply) or _RATING_BACKUP.findall(reply)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1 <= value <= 5 else None


def combine_orders(primary_first: Verdict | None, primary_second: Verdict | None) -> Outcome:
    """One row's outcome for the primary model from the two orders: `primary_first` is the verdict with the primary
    as assistant A, `primary_second` with the primary as assistant B. A win needs both orders to agree."""
    if primary_first is None or primary_second is None:
        return "unparsed"
    first = {"A": "win", "B": "loss", "C": "tie"}[primary_first]
    second = {"A": "loss", "B": "win", "C": "tie"}[primary_second]
    return first if first == second else "tie"  # type: ignore[return-value]


@dataclass(frozen=True)
class JudgedRow:
    """What the judge sees of one evaluated row."""

    id: str
    question: str
    reference: str | None


@dataclass
class JudgeResult:
    records: list[dict[str, Any]]  # judge.jsonl, one line per judge call
    metrics: dict[str, dict[str, float]]  # label -> judge_* metrics
    summary: dict[str, Any] = field(default_factory=dict)  # for the report and metrics.json


def pair_messages(row: JudgedRow, answer_a: str, answer_b: str) -> Messages:
    reference = row.reference or None
    blocks = [f"[User Question]\n{row.question}"]
    if reference:
        blocks.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]")
    blocks.append(f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]")
    blocks.append(f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
    blocks.append(_PAIR_REMINDER)
    system = _PAIR_SYSTEM.format(reference=_REFERENCE_NOTE if reference else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(blocks)}]


def grade_messages(row: JudgedRow, answer: str, dimension: str, meaning: str) -> Messages:
    reference = row.reference or None
    blocks = [f"[Question]\n{row.question}"]
    if reference:
        blocks.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]")
    blocks.append(f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
    blocks.append(_GRADE_REMINDER)
    system = _GRADE_SYSTEM.format(
        dimension=dimension.replace("_", " "),
        meaning=meaning.rstrip(".") + ".",
        reference=_REFERENCE_NOTE if reference else "",
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(blocks)}]


def run_judge(
    judge: ChatEndpoint,
    rows: Sequence[JudgedRow],
    outputs: dict[str, list[str]],
    primary: str,
    compared: Sequence[str],
    rubric: dict[str, str],
    modes: Sequence[str],
    max_new_tokens: int,
    concurrency: int,
    console: Console | None = None,
) -> JudgeResult:
    """Judge `outputs` (label -> one answer per row): `primary` against each of `compared` (pairwise) and every label
    on each `rubric` dimension (grade), as `modes` asks. Concurrent, with a progress bar."""
    calls: list[tuple[dict[str, Any], Messages]] = []
    if "pairwise" in modes:
        for other in compared:
            for index, row in enumerate(rows):
                mine, theirs = outputs[primary][index], outputs[other][index]
                for order, (a, b) in enumerate(((primary, other), (other, primary)), start=1):
                    record = {"kind": "pairwise", "id": row.id, "models": [primary, other], "order": order}
                    record |= {"a": a, "b": b}
                    calls.append((record, pair_messages(row, *((mine, theirs) if order == 1 else (theirs, mine)))))
    if "grade" in modes:
        for label in [primary, *compared]:
            for index, row in enumerate(rows):
                for dimension, meaning in rubric.items():
                    record = {"kind": "grade", "id": row.id, "model": label, "dimension": dimension}
                    calls.append((record, grade_messages(row, outputs[label][index], dimension, meaning)))
    answers = _ask_all(judge, [messages for _, messages in calls], max_new_tokens, concurrency, console)
    records = []
    for (record, messages), answer in zip(calls, answers, strict=True):
        record["prompt"] = messages[-1]["content"]  # what the judge read (the instructions are fixed per kind)
        reply = answer.text
        if record["kind"] == "pairwise":
            verdict = parse_pair_verdict(reply)
            preferred = None if verdict is None else {"A": record["a"], "B": record["b"], "C": "tie"}[verdict]
            record |= {"verdict": verdict, "preferred": preferred}
        else:
            record["rating"] = parse_rating(reply)
        record["reply"] = reply
        if answer.error is None:
            record |= {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.new_tokens}
        else:
            record["error"] = answer.error
        records.append(record)
    metrics = judge_metrics(records, primary, list(compared), list(rubric))
    summary = judge_summary(records, primary, list(compared), list(rubric), judge)
    return JudgeResult(records, metrics, summary)


def _ask_all(
    judge: ChatEndpoint, prompts: list[Messages], max_new_tokens: int, concurrency: int, console: Console | None
) -> list[ChatAnswer]:
    """Every prompt's answer; a request that failed is kept as an answer with its `error` (counted as unparsed)."""
    from rich.progress import Progress

    with Progress(console=console or Console(stderr=True)) as progress:
        task = progress.add_task(f"judge ({judge.model})", total=len(prompts))
        return chat_generate(
            judge,
            prompts,
            max_new_tokens,
            concurrency=concurrency,
            progress=lambda done: progress.advance(task, done),
            keep_failures=True,
        )


def pair_outcomes(records: list[dict[str, Any]], primary: str, other: str) -> dict[str, Outcome]:
    """Row id -> the primary's outcome against `other`, by the consistency rule."""
    verdicts: dict[str, dict[int, Verdict | None]] = {}
    for record in records:
        if record["kind"] == "pairwise" and record["models"] == [primary, other]:
            verdicts.setdefault(record["id"], {})[record["order"]] = record["verdict"]
    return {row: combine_orders(orders.get(1), orders.get(2)) for row, orders in verdicts.items()}


def _tally(outcomes: list[Outcome], flip: bool) -> dict[str, float]:
    wins = outcomes.count("loss" if flip else "win")
    losses = outcomes.count("win" if flip else "loss")
    ties = outcomes.count("tie")
    metrics: dict[str, float] = {"judge_wins": wins, "judge_ties": ties, "judge_losses": losses}
    judged = wins + ties + losses
    if judged:
        rate = (wins + 0.5 * ties) / judged
        low, high = wilson_interval(rate, judged)
        metrics |= {"judge_win_rate": rate, "judge_win_rate_ci_low": low, "judge_win_rate_ci_high": high}
    return metrics


def judge_metrics(
    records: list[dict[str, Any]], primary: str, compared: list[str], dimensions: list[str]
) -> dict[str, dict[str, float]]:
    """Label -> `judge_*` metrics. The primary's win rate is against the first compared model (the baseline); each
    compared model's is against the primary. Ties count half; unparsed rows are left out."""
    metrics: dict[str, dict[str, float]] = {label: {} for label in [primary, *compared]}
    pairwise = any(record["kind"] == "pairwise" for record in records)
    if pairwise:
        for index, other in enumerate(compared):
            outcomes = list(pair_outcomes(records, primary, other).values())
            metrics[other] |= _tally(outcomes, flip=True)
            if index == 0:
                metrics[primary] |= _tally(outcomes, flip=False)
    for label in metrics:
        mine = [
            record
            for record in records
            if (record["kind"] == "grade" and record["model"] == label)
            or (record["kind"] == "pairwise" and label in record["models"])
        ]
        if not mine:
            continue
        unparsed = sum(_unparsed(record) for record in mine)
        metrics[label] |= {"judge_unparsed": unparsed, "judge_unparsed_rate": unparsed / len(mine)}
        ratings = [r for r in mine if r["kind"] == "grade" and r["rating"] is not None]
        if ratings:
            metrics[label]["judge_score_mean"] = statistics.fmean(r["rating"] for r in ratings)
        for dimension in dimensions:
            scores = [r["rating"] for r in ratings if r["dimension"] == dimension]
            if scores:
                metrics[label][f"judge_{dimension}_mean"] = statistics.fmean(scores)
    return metrics


def _unparsed(record: dict[str, Any]) -> bool:
    return (record["verdict"] if record["kind"] == "pairwise" else record["rating"]) is None


def judge_summary(
    records: list[dict[str, Any]], primary: str, compared: list[str], dimensions: list[str], judge: ChatEndpoint
) -> dict[str, Any]:
    """What the report shows: per pair wins/ties/losses/unparsed, grade means, token use, a few reasons."""
    pairs = []
    for other in compared:
        outcomes = list(pair_outcomes(records, primary, other).values())
        if outcomes:
            tally = _tally(outcomes, flip=False)
            pairs.append({"models": [primary, other], "unparsed": outcomes.count("unparsed"), **tally})
    grades: dict[str, dict[str, float | None]] = {}
    for label in [primary, *compared]:
        row: dict[str, float | None] = {}
        for dimension in dimensions:
            scores = [
                r["rating"]
                for r in records
                if r["kind"] == "grade" and r["model"] == label and r["dimension"] == dimension and r["rating"]
            ]
            row[dimension] = statistics.fmean(scores) if scores else None
        if any(r["kind"] == "grade" and r["model"] == label for r in records):
            grades[label] = row
    examples = [
        {key: record[key] for key in ("kind", "id", "a", "b", "model", "dimension", "reply") if key in record}
        for record in records
        if record["reply"] and not _unparsed(record)
    ][:6]
    return {
        "judge": judge.describe(),
        "calls": len(records),
        "unparsed": sum(_unparsed(record) for record in records),
        "errors": sum("error" in record for record in records),
        "prompt_tokens": sum(record.get("prompt_tokens", 0) for record in records),
        "completion_tokens": sum(record.get("completion_tokens", 0) for record in records),
        "pairs": pairs,
        "grades": grades,
        "dimensions": dimensions,
        "examples": examples,
        "rule": "each pair judged in both orders; a win only when both orders agree, else a tie; rows without a "
        "verdict in either order are unparsed and left out; ties count half in the win rate",
    }
