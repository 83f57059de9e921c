"""Blind rating sessions for /dashboard/rate: which evaluation folders can be rated, each rater's shuffled queue of
items, and turning a submitted form into a stored `HumanRating` with the true labels resolved.

Blindness: the page shows "Answer A" / "Answer B" and posts back only the item's position in the rater's queue. The
queue (row order, seeded by rater and folder) and which model is A (seeded by rater and row) are recomputed here on
every request, so neither the page nor the form ever carries a model label.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from tuneloop.artifacts.ratings import (
    HIGHEST_SCORE,
    LOWEST_SCORE,
    RATING_MODES,
    TIE,
    EvaluatedRow,
    HumanRating,
    RatingMode,
    append_rating,
    blind_positions,
    model_labels,
    read_outputs,
    read_ratings,
    seeded_random,
)
from tuneloop.errors import DataError
from tuneloop.serve.gateway.errors import GatewayError
from tuneloop.workspace import EvalPaths, Workspace

RATER_PATTERN = re.compile(r"[\w.@+-]{1,64}")
NOTE_LIMIT = 4000


@dataclass(frozen=True)
class EvalFolder:
    """An evaluation folder with model answers to rate; `key` is its path in the workspace (its id in URLs)."""

    key: str
    paths: EvalPaths

    @property
    def id(self) -> str:
        """The folder in URLs and forms: a digest, because folder names carry the model labels (`...-tuned-vs-base`)
        and a rating page must not."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    @cached_property
    def rows(self) -> list[EvaluatedRow]:
        try:
            return read_outputs(self.paths.outputs)
        except DataError as error:
            raise GatewayError(500, error.message, kind="server_error", code="bad_outputs") from None

    @cached_property
    def labels(self) -> list[str]:
        return model_labels(self.rows)

    def pairs(self) -> list[tuple[str, str]]:
        """The comparisons pairwise mode offers: the evaluated model (first label) against each other model."""
        return [(self.labels[0], other) for other in self.labels[1:]]

    def ratings(self) -> list[HumanRating]:
        try:
            return read_ratings(self.paths.ratings)
        except DataError as error:
            raise GatewayError(500, error.message, kind="server_error", code="bad_ratings") from None


def eval_folders(workspace: Workspace) -> list[EvalFolder]:
    """Every evaluation folder of the workspace with an `outputs.jsonl`: runs' `eval/*` and the workspace's
    `evals/*`, newest first (folder names start with a timestamp)."""
    parents = [workspace.run(run_id).evals for run_id in workspace.run_ids()] + [workspace.evals]
    folders = [
        EvalFolder(folder.relative_to(workspace.root).as_posix(), EvalPaths(folder))
        for parent in parents
        if parent.is_dir()
        for folder in parent.iterdir()
        if EvalPaths(folder).outputs.is_file()
    ]
    return sorted(folders, key=lambda folder: folder.paths.root.name, reverse=True)


def find_folder(workspace: Workspace, folder_id: str) -> EvalFolder:
    """The listed folder with this id (never a path built from it: an id cannot leave the workspace)."""
    for folder in eval_folders(workspace):
        if folder.id == folder_id:
            return folder
    raise GatewayError(404, f"no evaluation folder {folder_id!r} with outputs.jsonl", param="folder")


@dataclass(frozen=True)
class RatingItem:
    """One thing to rate: a row, and what is shown as A (and B) -> the true label (never sent to the page)."""

    position: int
    row: EvaluatedRow
    answers: dict[str, str]


@dataclass
class RatingSession:
    """One rater's queue in one folder and mode: every item in the rater's own shuffled order."""

    folder: EvalFolder
    rater: str
    mode: RatingMode
    pair: int  # pairwise: 1-based index into folder.pairs()
    items: list[RatingItem] = field(default_factory=list)
    rated: set[int] = field(default_factory=set)  # positions this rater already rated

    @classmethod
    def open(cls, folder: EvalFolder, rater: str, mode: str, pair: int = 1) -> RatingSession:
        rater = check_rater(rater)
        if mode not in RATING_MODES:
            raise GatewayError(400, f"mode must be one of {', '.join(RATING_MODES)}, not {mode!r}", param="mode")
        session = cls(folder, rater, mode, pair)  # type: ignore[arg-type]
        session.items = session._queue()
        done = {_rated_key(rating) for rating in folder.ratings() if rating.rater == rater and rating.mode == mode}
        session.rated = {item.position for item in session.items if _item_key(item) in done}
        return session

    def _queue(self) -> list[RatingItem]:
        rows = self.folder.rows
        if self.mode == "pairwise":
            pairs = self.folder.pairs()
            if not pairs:
                raise GatewayError(400, f"{self.folder.key} has answers of one model: rate it in single mode")
            if not 1 <= self.pair <= len(pairs):
                raise GatewayError(400, f"pair must be 1-{len(pairs)}, not {self.pair}", param="pair")
            labels = pairs[self.pair - 1]
            units = [(row, labels) for row in rows if all(label in row.outputs for label in labels)]
        else:
            units = [(row, (label,)) for row in rows for label in self.folder.labels if label in row.outputs]
        seeded_random(self.rater, self.folder.id, self.mode, self.pair).shuffle(units)
        return [
            RatingItem(position, row, blind_positions(labels, self.rater, row.id, *labels))
            for position, (row, labels) in enumerate(units)
        ]

    def next_item(self) -> RatingItem | None:
        return next((item for item in self.items if item.position not in self.rated), None)

    def record(self, form: Mapping[str, str], dimensions: list[str]) -> HumanRating:
        """Validate a submitted form (400 naming the field), resolve the labels and append the rating."""
        position = _integer(form, "position")
        if not 0 <= position < len(self.items):
            raise GatewayError(400, f"position must be 0-{len(self.items) - 1}, not {position}", param="position")
        item = self.items[position]
        if form.get("row_id") != item.row.id:  # outputs.jsonl changed since the page was shown
            raise GatewayError(409, "this item changed since the page was shown: reload it", param="row_id")
        preference = None
        if self.mode == "pairwise":
            choice = (form.get("preference") or "").strip()
            if choice not in (*item.answers, TIE):
                raise GatewayError(400, f"preference must be A, B or {TIE}, not {choice!r}", param="preference")
            preference = TIE if choice == TIE else item.answers[choice]
        scores = {
            label: {dimension: _score(form, f"{shown}.{dimension}") for dimension in dimensions}
            for shown, label in item.answers.items()
        }
        note = (form.get("note") or "").strip()
        if len(note) > NOTE_LIMIT:
            raise GatewayError(400, f"note is longer than {NOTE_LIMIT} characters", param="note")
        rating = HumanRating(
            time=time.time(),
            rater=self.rater,
            row_id=item.row.id,
            mode=self.mode,
            answers=item.answers,
            preference=preference,
            scores=scores,
            note=note,
        )
        append_rating(self.folder.paths.ratings, rating)
        self.rated.add(position)
        return rating


def check_rater(rater: str) -> str:
    rater = (rater or "").strip()
    if not RATER_PATTERN.fullmatch(rater):
        raise GatewayError(
            400, "rater must be 1-64 letters, digits or . _ @ + - (e.g. a name or an e-mail address)", param="rater"
        )
    return rater


def _rated_key(rating: HumanRating) -> tuple[str, frozenset[str]]:
    return rating.row_id, rating.labels


def _item_key(item: RatingItem) -> tuple[str, frozenset[str]]:
    return item.row.id, frozenset(item.answers.values())


def _integer(form: Mapping[str, str], name: str) -> int:
    value = (form.get(name) or "").strip()
    if not re.fullmatch(r"\d{1,9}", value):
        raise GatewayError(400, f"{name} must be a whole number, not {value!r}", param=name)
    return int(value)


def _score(form: Mapping[str, str], name: str) -> int:
    value = (form.get(name) or "").strip()
    if not re.fullmatch(f"[{LOWEST_SCORE}-{HIGHEST_SCORE}]", value):
        shown = "missing" if not value else repr(value[:20])
        raise GatewayError(400, f"{name} must be a score {LOWEST_SCORE}-{HIGHEST_SCORE}, not {shown}", param=name)
    return int(value)
