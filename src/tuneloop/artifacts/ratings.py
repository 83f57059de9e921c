"""Human evaluation files of an evaluation folder: the rows people rate (`outputs.jsonl`, written by `tuneloop eval`)
and their ratings (`ratings.jsonl`, appended by the gateway's /dashboard/rate and by the Label Studio import).

Both the gateway (which must not import `evaluate`) and `evaluate.human` (which aggregates) read them, so the record
types and the seeded blind shuffles live here, once.

A rating is one JSON object per line: `time`, `rater`, `row_id`, `mode` (`pairwise` | `single`), `answers` (what
the rater saw -> the true model label, e.g. {"A": "base", "B": "tuned"}), `preference` (a label or "tie"; pairwise
only), `scores` ({label: {dimension: 1-5}}), `note` and `source` (`dashboard` or `labelstudio:<annotation id>`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneloop.errors import DataError

RatingMode = Literal["pairwise", "single"]
RATING_MODES: tuple[RatingMode, ...] = ("pairwise", "single")
TIE = "tie"
LOWEST_SCORE, HIGHEST_SCORE = 1, 5

_append_lock = threading.Lock()


class EvaluatedRow(BaseModel):
    """One line of `outputs.jsonl`: a prompt, its reference and every evaluated model's answer by label."""

    model_config = ConfigDict(extra="ignore")

    id: str
    prompt: str = ""
    messages: list[dict[str, Any]] = Field(default_factory=list)
    reference: str = ""
    outputs: dict[str, str]


class HumanRating(BaseModel):
    """One rater's judgement of one row: a pairwise comparison (preference + scores of both answers) or a single
    answer's scores. Labels are the true model labels, resolved by whoever showed the answers blind."""

    model_config = ConfigDict(extra="ignore")

    time: float
    rater: str
    row_id: str
    mode: RatingMode
    answers: dict[str, str] = Field(description="Position shown to the rater (A, B) -> the model label.")
    preference: str | None = Field(None, description="The preferred label, or `tie`; pairwise only.")
    scores: dict[str, dict[str, int]] = Field(default_factory=dict, description="Label -> dimension -> 1-5.")
    note: str = ""
    source: str = "dashboard"

    @field_validator("scores")
    @classmethod
    def _scores_in_range(cls, scores: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for label, by_dimension in scores.items():
            for dimension, score in by_dimension.items():
                if not LOWEST_SCORE <= score <= HIGHEST_SCORE:
                    raise ValueError(f"scores.{label}.{dimension} is {score}, not 1-5")
        return scores

    @property
    def labels(self) -> frozenset[str]:
        """The models this rating judged."""
        return frozenset(self.answers.values())


def read_outputs(path: Path) -> list[EvaluatedRow]:
    """The rows of an `outputs.jsonl`; a DataError naming the line when one is not a valid row."""
    if not path.exists():
        raise DataError(f"{path} does not exist", hint="`tuneloop eval` writes outputs.jsonl into its report folder")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(EvaluatedRow.model_validate_json(line))
        except ValidationError as error:
            raise DataError(f"{path}:{number} is not an evaluated row: {_first_error(error)}") from None
    return rows


def model_labels(rows: list[EvaluatedRow]) -> list[str]:
    """The models' labels in their order in the file (the evaluated model first)."""
    return list(dict.fromkeys(label for row in rows for label in row.outputs))


def read_ratings(path: Path) -> list[HumanRating]:
    """Every rating in a `ratings.jsonl` (none when it does not exist); a DataError naming a malformed line."""
    if not path.exists():
        return []
    ratings = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ratings.append(HumanRating.model_validate_json(line))
        except ValidationError as error:
            raise DataError(
                f"{path}:{number} is not a rating: {_first_error(error)}", hint="fix or delete that line"
            ) from None
    return ratings


def append_rating(path: Path, rating: HumanRating) -> None:
    """One more line; a lock keeps concurrent requests of this process from interleaving their lines."""
    with _append_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as handle:
            # A crash mid-append can leave a last line without its newline: this one must not be glued onto it.
            glued = False
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                glued = handle.read(1) != b"\n"
            handle.write((b"\n" if glued else b"") + rating.model_dump_json().encode() + b"\n")


def write_ratings(path: Path, ratings: list[HumanRating]) -> None:
    """Replace the file (atomically: a reader never sees half of it)."""
    with _append_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(rating.model_dump_json() + "\n" for rating in ratings), encoding="utf-8")
        temporary.replace(path)


def seeded_random(*parts: object) -> random.Random:
    """A generator seeded by `parts` the same way in every process (Python's `hash()` of a str is salted per
    process, so it cannot be the seed of a shuffle the server must recompute when the rating comes back)."""
    digest = hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def blind_positions(labels: tuple[str, ...], *seed: object) -> dict[str, str]:
    """Which label is shown as A (and B): shuffled by `seed`, e.g. (rater, row id)."""
    shuffled = list(labels)
    seeded_random(*seed).shuffle(shuffled)
    return dict(zip("AB", shuffled, strict=False))


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
