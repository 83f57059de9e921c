"""`POST /v1/feedback`: ratings against response ids, kept per route and variant so a preference rate per variant
can be computed, and appended to a JSON Lines file.

A rating is a thumb (`up`/`down`; `thumbs_up`, `good`, `positive` and `thumbs_down`, `bad`, `negative` are
synonyms, any case) or an integer 1-5, where a numeric string such as "4" is the integer 4. Positive means `up`,
4 or 5 ("top-two-box": 3 is not positive); the preference rate is the share of positive ratings. Anything else (0,
6, 1.5, "1.5", true, "maybe") is refused.

What a restart keeps: the ratings, rebuilt from the JSON Lines file when the store opens (malformed lines are
skipped and counted in `skipped_lines`). What it loses: the served-response counts (`responses` in the summary
counts responses served since this start) and the map from response id to variant, so a response served before the
restart can no longer be rated (404).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

log = logging.getLogger("tuneloop.gateway")

POSITIVE_THUMBS = ("up", "thumbs_up", "good", "positive")
NEGATIVE_THUMBS = ("down", "thumbs_down", "bad", "negative")
LOWEST_STARS, HIGHEST_STARS, FIRST_POSITIVE_STARS = 1, 5, 4
ACCEPTED_RATINGS = "`up`/`down` (or thumbs_up, good, positive / thumbs_down, bad, negative) or an integer 1-5"


def parse_rating(value: object) -> str | int:
    """The canonical rating: "up", "down" or an int 1-5; a PydanticCustomError (a 400 naming `rating`) otherwise."""
    # bool is an int subclass: without this, `true` would be a rating of 1.
    if isinstance(value, int) and not isinstance(value, bool) and LOWEST_STARS <= value <= HIGHEST_STARS:
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in POSITIVE_THUMBS:
            return "up"
        if word in NEGATIVE_THUMBS:
            return "down"
        if re.fullmatch(f"[{LOWEST_STARS}-{HIGHEST_STARS}]", word):
            return int(word)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise PydanticCustomError(
        "rating", "must be {accepted}, not {value}", {"accepted": ACCEPTED_RATINGS, "value": shown}
    )


def is_positive(rating: str | int) -> bool:
    """Whether a canonical rating (see parse_rating) counts as a preference for the variant."""
    return rating == "up" if isinstance(rating, str) else rating >= FIRST_POSITIVE_STARS


Rating = Annotated[
    str | int,
    PlainValidator(parse_rating),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": [*POSITIVE_THUMBS, *NEGATIVE_THUMBS]},
                {"type": "integer", "minimum": LOWEST_STARS, "maximum": HIGHEST_STARS},
                {"type": "string", "pattern": f"^[{LOWEST_STARS}-{HIGHEST_STARS}]$"},
            ],
            "description": f"{ACCEPTED_RATINGS}; `up`, 4 and 5 count as positive.",
        }
    ),
]


class FeedbackRequest(BaseModel):
    response_id: str
    rating: Rating
    comment: str | None = None


Key = tuple[str, str | None]  # (model asked for, variant)


class FeedbackStore:
    def __init__(self, path: Path | None, remember: int = 100_000) -> None:
        self.path = path
        self.responses: OrderedDict[str, Key] = OrderedDict()  # response id -> key, the newest `remember`
        self.remember = remember
        self.lock = threading.Lock()
        self.served: dict[Key, int] = {}
        self.ratings: dict[Key, list[bool]] = {}
        self.skipped_lines = 0
        # A crash mid-append can leave a last line without its newline: the next entry must not be glued onto it.
        self._needs_newline = False
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8", errors="replace")
        self._needs_newline = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                model, variant, positive = entry["model"], entry["variant"], entry["positive"]
            except (ValueError, TypeError, KeyError):
                self.skipped_lines += 1
                continue
            if not isinstance(model, str) or not isinstance(variant, str | None) or not isinstance(positive, bool):
                self.skipped_lines += 1
                continue
            self.ratings.setdefault((model, variant), []).append(positive)
        if self.skipped_lines:
            log.warning("skipped %d malformed lines of %s", self.skipped_lines, path)

    def served_response(self, response_id: str, model: str, variant: str | None) -> None:
        with self.lock:
            self.responses[response_id] = (model, variant)
            if len(self.responses) > self.remember:
                self.responses.popitem(last=False)
            self.served[(model, variant)] = self.served.get((model, variant), 0) + 1

    def record(self, feedback: FeedbackRequest) -> dict[str, Any] | None:
        """The stored entry, or None when the response id is unknown (never served, forgotten, or before a restart)."""
        with self.lock:
            served = self.responses.get(feedback.response_id)
            if served is None:
                return None
            positive = is_positive(feedback.rating)
            entry = {
                "time": time.time(),
                "response_id": feedback.response_id,
                "model": served[0],
                "variant": served[1],
                "rating": feedback.rating,
                "positive": positive,
                "comment": feedback.comment,
            }
            self.ratings.setdefault(served, []).append(positive)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(("\n" if self._needs_newline else "") + json.dumps(entry) + "\n")
                self._needs_newline = False
        return entry

    def summary(self) -> list[dict[str, Any]]:
        with self.lock:
            keys = set(self.served) | set(self.ratings)
            return [
                {
                    "model": model,
                    "variant": variant,
                    "responses": self.served.get((model, variant), 0),
                    "ratings": len(self.ratings.get((model, variant), [])),
                    "preference_rate": (
                        sum(self.ratings[(model, variant)]) / len(self.ratings[(model, variant)])
                        if self.ratings.get((model, variant))
                        else None
                    ),
                }
                for model, variant in sorted(keys, key=lambda key: (key[0], key[1] or ""))
            ]
