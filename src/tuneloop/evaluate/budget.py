"""How much each evaluated model may generate: a token budget from the reference answers' lengths and stop strings
from their shape, so a verbose model (typically the base) stops near the task's natural end instead of running to
`eval.max_new_tokens` on every row. The in-process path and the engines both take what `generation_budget` says.

Budget = 1.5 x the longest reference answer + 16 tokens, at least 16, at most `eval.max_new_tokens`:
- the longest reference, not a percentile: no reference-length answer is ever cut, whatever the spread;
- x1.5: a correct answer worded differently (or tokenized less well) than the reference still fits;
- +16 and the floor of 16: room for a short preamble before a one-word answer ("The sentiment is positive."),
  which a chat model prepends and the accuracy metric still reads (the first label found counts);
- the cap: long-form tasks keep `max_new_tokens`, as before.
On SST-2 (one-word labels) that is 18 tokens instead of 128: a row that rambles stops 7x sooner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuneloop.config import EvalConfig

SLACK_TOKENS = 16
LENGTH_FACTOR = 1.5


@dataclass(frozen=True)
class GenerationBudget:
    max_new_tokens: int
    stop: list[str]  # generation ends before the first of these; the stop string is not part of the answer
    reason: str  # shown in the evaluation's log


def answer_budget(reference_token_lengths: list[int], cap: int) -> int:
    """New tokens allowed per answer: ceil(1.5 x longest reference) + 16, clamped to [16, cap] (cap wins if smaller)."""
    if cap < 1:
        raise ValueError(f"cap must be at least 1, not {cap}")
    longest = max(reference_token_lengths, default=0)
    budget = max(math.ceil(longest * LENGTH_FACTOR) + SLACK_TOKENS, SLACK_TOKENS)
    return min(budget, cap)


def stop_strings(references: list[str], configured: list[str] | None = None) -> list[str]:
    """`configured` (`eval.stop`) when set (`[]`: no stop strings); else a newline when every reference answer is one
    line (a one-line task's answer ends at its line end), else none (multi-line answers end at EOS)."""
    if configured is not None:
        return [text for text in configured if text]
    if references and all("\n" not in reference.strip() for reference in references):
        return ["\n"]
    return []


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """`text` cut before the first stop string, as an engine's `stop` cuts it (for generators without stop support,
    and to compare answers made with and without it)."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index >= 0), default=len(text))
    return text[:cut].strip()


def reference_token_lengths(tokenizer: Any, references: list[str]) -> list[int]:
    """Token counts of the reference answers in the evaluated model's tokenizer (no special tokens)."""
    return [len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]


def generation_budget(settings: EvalConfig, references: list[str], token_lengths: list[int]) -> GenerationBudget:
    """The budget and stop strings for one evaluation (the same for every model, so their answers compare):
    `eval.answer_budget: auto` sizes it from the references, `fixed` keeps `eval.max_new_tokens`."""
    stop = stop_strings(references, settings.stop)
    shown_stop = ", ".join(repr(s) for s in stop) or "none"
    if settings.answer_budget == "fixed":
        return GenerationBudget(settings.max_new_tokens, stop, f"fixed {settings.max_new_tokens}; stop {shown_stop}")
    budget = answer_budget(token_lengths, settings.max_new_tokens)
    longest = max(token_lengths, default=0)
    return GenerationBudget(
        budget,
        stop,
        f"{budget} new tokens (longest reference {longest} tokens, cap {settings.max_new_tokens}); stop {shown_stop}",
    )
