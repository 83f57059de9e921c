"""The generation budget and stop strings evaluation gives every model, and the parity report between generators."""

from __future__ import annotations

import pytest

from tuneloop.config import EvalConfig
from tuneloop.evaluate.budget import (
    answer_budget,
    generation_budget,
    reference_token_lengths,
    stop_strings,
    truncate_at_stop,
)
from tuneloop.evaluate.parity import parity


def test_answer_budget_is_one_and_a_half_longest_reference_plus_slack_clamped() -> None:
    assert answer_budget([1, 1, 2], cap=128) == 19  # ceil(2 * 1.5) + 16
    assert answer_budget([40, 3], cap=128) == 76  # the longest reference decides, not the typical one
    assert answer_budget([300], cap=128) == 128  # long-form tasks keep the cap
    assert answer_budget([], cap=128) == 16  # no references: the floor
    assert answer_budget([0], cap=128) == 16
    assert answer_budget([5], cap=10) == 10  # a cap below the floor wins
    with pytest.raises(ValueError, match="cap"):
        answer_budget([5], cap=0)


def test_stop_strings_follow_the_references_shape_unless_configured() -> None:
    assert stop_strings(["positive", "negative "]) == ["\n"]
    assert stop_strings(["one line", "two\nlines"]) == []
    assert stop_strings(["trailing newline only\n"]) == ["\n"]  # surrounding whitespace is not a second line
    assert stop_strings([]) == []
    assert stop_strings(["positive"], configured=[]) == []  # eval.stop: [] turns stopping off
    assert stop_strings(["a\nb"], configured=["###", ""]) == ["###"]


def test_truncate_at_stop_cuts_before_the_first_stop_string() -> None:
    assert truncate_at_stop("positive\nBecause the review...", ["\n"]) == "positive"
    assert truncate_at_stop("a ### b END c", ["END", "###"]) == "a"
    assert truncate_at_stop("no stop here ", ["\n"]) == "no stop here"
    assert truncate_at_stop("kept", []) == "kept"


def test_generation_budget_auto_and_fixed() -> None:
    references = ["positive", "negative"]
    auto = generation_budget(EvalConfig(max_new_tokens=128), references, [1, 2])
    assert (auto.max_new_tokens, auto.stop) == (19, ["\n"])
    assert "longest reference 2 tokens" in auto.reason
    fixed = generation_budget(EvalConfig(max_new_tokens=64, answer_budget="fixed", stop=[]), references, [1, 2])
    assert (fixed.max_new_tokens, fixed.stop) == (64, [])


def test_reference_token_lengths_use_the_tokenizer(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["positive", "a much longer reference answer than the other"]
    lengths = reference_token_lengths(tokenizer, texts)
    assert lengths == [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert lengths[1] > lengths[0] >= 1


def test_parity_reports_share_and_first_differences() -> None:
    report = parity(["Paris", "It is 4.", "yes ", "blue"], ["Paris", "It is 5.", "yes", "green"], shown=1)
    assert (report["rows"], report["equal"], report["equal_share"]) == (4, 2, 0.5)
    assert report["differences"] == [{"row": 1, "reference": "It is 4.", "engine": "It is 5.", "same_prefix_chars": 6}]
    assert parity([], [])["equal_share"] == 1.0
    with pytest.raises(ValueError, match="2 reference answers but 1"):
        parity(["a", "b"], ["a"])
