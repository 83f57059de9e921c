"""Parity of two generators' greedy answers on the same prompts (in-process `generate` vs a serving engine): the
share of rows answered identically and the first rows that differ, where they part.

Equal answers are expected at the same precision; a difference is not by itself a bug: greedy decoding flips where
the top two tokens nearly tie, and fp32, bf16 and quantized engines (or batch shapes) break such ties differently
(docs/FACTS: measured on SmolLM2). What matters is that the difference is small and reported.
"""

from __future__ import annotations

from typing import Any


def parity(reference_answers: list[str], engine_answers: list[str], shown: int = 5) -> dict[str, Any]:
    """{rows, equal, equal_share, differences: [{row, reference, engine, same_prefix_chars}, ...]} comparing answers
    after stripping surrounding whitespace; `differences` lists the first `shown` differing rows."""
    if len(reference_answers) != len(engine_answers):
        raise ValueError(f"{len(reference_answers)} reference answers but {len(engine_answers)} engine answers")
    differing = [
        index
        for index, (reference, engine) in enumerate(zip(reference_answers, engine_answers, strict=True))
        if reference.strip() != engine.strip()
    ]
    rows = len(reference_answers)
    return {
        "rows": rows,
        "equal": rows - len(differing),
        "equal_share": (rows - len(differing)) / rows if rows else 1.0,
        "differences": [
            {
                "row": index,
                "reference": reference_answers[index].strip(),
                "engine": engine_answers[index].strip(),
                "same_prefix_chars": _same_prefix(reference_answers[index].strip(), engine_answers[index].strip()),
            }
            for index in differing[:shown]
        ],
    }


def _same_prefix(first: str, second: str) -> int:
    """Characters the two answers share from the start (where greedy decoding parted)."""
    return next(
        (index for index, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), min(len(first), len(second))
    )
