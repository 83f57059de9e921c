"""The filters of `tuneloop data synth`, each dropped row counted under its reason.

Instructions (self-instruct, before any answer is paid for): Self-Instruct's rule, ROUGE-L F-measure against every
seed instruction and every instruction accepted so far (`similar_to_seed`, `similar_to_generated`).

Rows (instruction + answer): the data pipeline's own filters from `data.filters` (`filters.py`), run over the seeds
followed by the generated rows, so a generated row is checked against the seeds and against the rows before it:
`duplicate` / `duplicate_of_seed` (normalised text), `toxic`, `near_duplicate` / `near_duplicate_of_seed` (MinHash
LSH), then `too_short` / `too_long` in tokens of the config's tokenizer, by the same rule as `tuneloop data prepare`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneloop.config import DataConfig
from tuneloop.data.filters import Rejection, drop_exact_duplicates, drop_near_duplicates, drop_toxic
from tuneloop.data.formats import RowError, Sample
from tuneloop.data.render import ChatRenderer
from tuneloop.data.synth_prompts import Task

GENERATED_SOURCE = "<generated>"  # the `source` of generated samples: how a rejection's detail tells seed from row


class InstructionPool:
    """Accepted instructions; `admit` says why a new one is too close to a seed or an accepted one (or None)."""

    def __init__(self, seed_instructions: list[str], threshold: float) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self._tokenize = DefaultTokenizer(use_stemmer=False).tokenize
        self.threshold = threshold
        self._seeds = [self._tokenize(text) for text in dict.fromkeys(seed_instructions)]
        self._seed_texts = {_normalised(text) for text in seed_instructions}
        self._accepted: list[list[str]] = []
        self._accepted_texts: set[str] = set()

    def admit(self, task: Task) -> str | None:
        text = _normalised(task.instruction)
        if text in self._seed_texts:
            return "similar_to_seed"
        if text in self._accepted_texts:
            return "similar_to_generated"
        tokens = self._tokenize(task.instruction)
        if any(rouge_l(tokens, seed) >= self.threshold for seed in self._seeds):
            return "similar_to_seed"
        if any(rouge_l(tokens, other) >= self.threshold for other in self._accepted):
            return "similar_to_generated"
        self._accepted.append(tokens)
        self._accepted_texts.add(text)
        return None


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (longest common subsequence), as `rouge_score` computes it."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in candidate:
        current = [0]
        for position, other in enumerate(reference, start=1):
            current.append(previous[position - 1] + 1 if token == other else max(previous[position], current[-1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def filter_rows(
    new: list[Sample], earlier: list[Sample], data: DataConfig, tokenizer: Any
) -> tuple[list[Sample], list[Rejection]]:
    """The `new` generated rows that pass `data.filters` against `earlier` (seeds first, then rows kept before);
    rejections of `earlier` rows are ignored (only new rows are judged)."""
    filters = data.filters
    steps: list[tuple[Callable[[list[Sample]], tuple[list[Sample], list[Rejection]]], bool]] = []
    if filters.exact_duplicates:
        steps.append((drop_exact_duplicates, True))
    if filters.toxicity.enabled:
        steps.append((lambda rows: drop_toxic(rows, filters.toxicity), False))
    if filters.near_duplicates.enabled:
        steps.append((lambda rows: drop_near_duplicates(rows, filters.near_duplicates), True))
    rejected: list[Rejection] = []
    for step, against_earlier in steps:
        if not new:
            break
        new_ids = {id(sample) for sample in new}
        rows = earlier + new if against_earlier else new
        kept, dropped = step(rows)
        rejected += [_attributed(rejection) for rejection in dropped if id(rejection.sample) in new_ids]
        new = [sample for sample in kept if id(sample) in new_ids]
    kept, too_long_or_short = _length_filter(new, data, tokenizer)
    return kept, rejected + too_long_or_short


def _attributed(rejection: Rejection) -> Rejection:
    """A duplicate of a seed gets its own reason: `duplicate_of_seed`, `near_duplicate_of_seed`."""
    if rejection.reason in ("duplicate", "near_duplicate") and f"{GENERATED_SOURCE}#row" not in rejection.detail:
        return Rejection(rejection.sample, f"{rejection.reason}_of_seed", rejection.detail)
    return rejection


def _length_filter(samples: list[Sample], data: DataConfig, tokenizer: Any) -> tuple[list[Sample], list[Rejection]]:
    """`too_short` / `too_long` as `tuneloop data prepare` decides them (rendered with the chat template)."""
    if not samples:
        return [], []
    renderer = ChatRenderer(tokenizer, data.train_on)
    max_tokens = data.filters.max_tokens or (None if data.truncation else data.max_seq_len)
    kept: list[Sample] = []
    rejected: list[Rejection] = []
    texts = []
    for sample in samples:
        try:
            texts.append((sample, renderer.render_text(sample)))
        except RowError as error:
            rejected.append(Rejection(sample, error.reason, error.detail))
    for (sample, _), rendered in zip(texts, renderer.encode([text for _, text in texts]), strict=True):
        size = len(rendered.input_ids)
        if size < data.filters.min_tokens:
            rejected.append(Rejection(sample, "too_short", f"{size} tokens < min_tokens={data.filters.min_tokens}"))
        elif max_tokens is not None and size > max_tokens:
            rejected.append(Rejection(sample, "too_long", f"{size} tokens > {max_tokens}"))
        else:
            kept.append(sample)
    return kept, rejected


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())
