from __future__ import annotations

from tuneloop.config import NearDuplicateFilter, ToxicityFilter
from tuneloop.data.filters import drop_exact_duplicates, drop_near_duplicates, drop_toxic
from tuneloop.data.formats import Message, Sample


def qa(question: str, answer: str, row: int) -> Sample:
    return Sample([Message("user", question), Message("assistant", answer, True)], "chat", "src.jsonl", row, row)


def test_exact_duplicates_ignore_case_and_spacing() -> None:
    samples = [qa("What is 2+2?", "4", 1), qa("what  is 2+2?", "4", 2), qa("What is 3+3?", "6", 3)]
    kept, rejected = drop_exact_duplicates(samples)
    assert [s.row for s in kept] == [1, 3]
    assert rejected[0].reason == "duplicate" and "src.jsonl:1" in rejected[0].detail


def test_near_duplicates_by_minhash_threshold() -> None:
    base = "the committee met on tuesday to discuss the new budget for the city parks and the public libraries"
    samples = [
        qa(base, "They approved it after a long debate about costs.", 1),
        qa(base.replace("tuesday", "wednesday"), "They approved it after a long debate about costs.", 2),
        qa("an entirely different question about astronomy and distant galaxies", "Stars are far away.", 3),
    ]
    kept, rejected = drop_near_duplicates(samples, NearDuplicateFilter(threshold=0.7))
    assert [s.row for s in kept] == [1, 3]
    assert rejected[0].reason == "near_duplicate" and "src.jsonl:1" in rejected[0].detail
    kept_strict, _ = drop_near_duplicates(samples, NearDuplicateFilter(threshold=0.99))
    assert len(kept_strict) == 3


def test_shared_instruction_does_not_make_short_rows_near_duplicates() -> None:
    instruction = "Classify the sentiment of the following movie review sentence as positive or negative"
    samples = [
        qa(f"{instruction}\n\n{word} film", label, i)
        for i, (word, label) in enumerate([(f"w{i} great", "positive") for i in range(30)], start=1)
    ]
    kept, _ = drop_near_duplicates(samples, NearDuplicateFilter(threshold=0.85))
    assert len(kept) == 30


def test_toxicity_filter_and_scope() -> None:
    samples = [
        qa("Say something", "You are a fucking idiot and a piece of shit.", 1),
        qa("Say hi", "Hello there!", 2),
        qa("Why do people say shit and fuck so much?", "Strong emotions, mostly.", 3),
    ]
    kept, rejected = drop_toxic(samples, ToxicityFilter(threshold=0.8))
    assert [r.sample.row for r in rejected[:1]] == [1] and rejected[0].reason == "toxic"
    assert 2 in [s.row for s in kept]
    kept_assistant, rejected_assistant = drop_toxic(samples, ToxicityFilter(threshold=0.8, scope="assistant"))
    assert [r.sample.row for r in rejected_assistant] == [1]
    assert [s.row for s in kept_assistant] == [2, 3]
