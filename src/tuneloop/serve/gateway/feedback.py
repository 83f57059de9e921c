"""`POST /v1/feedback`: ratings (thumbs or 1-5) against response ids, kept per route and variant, so preference
rates per variant can be computed; appended to a JSON Lines file so a restart loses none."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class FeedbackRequest(BaseModel):
    response_id: str
    rating: str | int = Field(description="`up`/`down`, or 1-5 (4 and 5 count as positive).")
    comment: str | None = None


class FeedbackStore:
    def __init__(self, path: Path | None, remember: int = 100_000) -> None:
        self.path = path
        self.responses: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # id -> (model, variant)
        self.remember = remember
        self.lock = threading.Lock()
        self.served: dict[tuple[str, str | None], int] = {}
        self.ratings: dict[tuple[str, str | None], list[bool]] = {}

    def served_response(self, response_id: str, model: str, variant: str | None) -> None:
        with self.lock:
            self.responses[response_id] = (model, variant)
            if len(self.responses) > self.remember:
                self.responses.popitem(last=False)
            self.served[(model, variant)] = self.served.get((model, variant), 0) + 1

    def record(self, feedback: FeedbackRequest) -> dict[str, Any] | None:
        with self.lock:
            served = self.responses.get(feedback.response_id)
            if served is None:
                return None
            positive = _positive(feedback.rating)
            self.ratings.setdefault(served, []).append(positive)
        entry = {
            "time": time.time(),
            "response_id": feedback.response_id,
            "model": served[0],
            "variant": served[1],
            "rating": feedback.rating,
            "positive": positive,
            "comment": feedback.comment,
        }
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock, self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
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


def _positive(rating: str | int) -> bool:
    if isinstance(rating, int):
        return rating >= 4
    return rating.lower() in ("up", "thumbs_up", "good", "positive", "+1", "1")
