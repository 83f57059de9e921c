"""`POST /v1/feedback`: ratings against response ids, kept per route and variant so a preference rate per variant
can be computed, and appended to a JSON Lines file.

A rating is a thumb (`up`/`down`; `thumbs_up`, `good`, `positive` and `thumbs_down`, `bad`, `negative` are
synonyms, any case) or an integer 1-5, where a numeric string such as "4" is the integer 4. Positive means `up`,
4 or 5 ("top-two-box": 3 is not positive); the preference rate is the share of positive ratings. Anything else (0,
6, 1.5, "1.5", true, "maybe") is refused.

Per variant the summary gives the preference rate with its 95% Wilson interval, and per route each variant against
the route's control (its first variant in `serve.routes`): the difference in preference rate with Newcombe's 95%
interval, Fisher's exact p-value, a `significant` flag (p < 0.05) and a verdict in words (tuneloop.stats).

Locally (no `serve.state_url`), what a restart keeps: the ratings, rebuilt from the JSON Lines file when the store
opens (malformed lines are skipped and counted in `skipped_lines`). What it loses: the served-response counts
(`responses` in the summary counts responses served since this start) and the map from response id to variant, so a
response served before the restart can no longer be rated (404). Under Redis all of it is shared by the replicas
and outlives any of them: a response served by one can be rated through another (for 24 hours).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from tuneloop.config import RouteConfig
from tuneloop.serve.gateway.stores.base import FeedbackBackend, Key
from tuneloop.serve.gateway.stores.local import LocalFeedback
from tuneloop.stats import ratings_needed, two_proportions, wilson_interval

POSITIVE_THUMBS = ("up", "thumbs_up", "good", "positive")
NEGATIVE_THUMBS = ("down", "thumbs_down", "bad", "negative")
LOWEST_STARS, HIGHEST_STARS, FIRST_POSITIVE_STARS = 1, 5, 4
ACCEPTED_RATINGS = "`up`/`down` (or thumbs_up, good, positive / thumbs_down, bad, negative) or an integer 1-5"
DETECTABLE_DIFFERENCE = 0.10  # the verdict says how many ratings would show a difference this large (10 points)


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


class FeedbackStore:
    """Ratings against served responses, and the preference summary per model and variant. Storage is a
    `FeedbackBackend`: a JSON Lines file (or memory) for one gateway, or Redis shared by replicas (stores/)."""

    def __init__(self, storage: Path | FeedbackBackend | None = None, remember: int = 100_000) -> None:
        """`storage`: the ratings file (None: memory only) or a backend; `remember`: how many of the newest response
        ids a local store can rate."""
        self.backend = LocalFeedback(storage, remember) if storage is None or isinstance(storage, Path) else storage

    @property
    def skipped_lines(self) -> int:
        return self.backend.skipped_lines

    def served_response(self, response_id: str, model: str, variant: str | None) -> None:
        self.backend.served(response_id, (model, variant))

    def record(self, feedback: FeedbackRequest) -> dict[str, Any] | None:
        """The stored entry, or None when the response id is unknown (never served, forgotten, or before a restart)."""
        served = self.backend.lookup(feedback.response_id)
        if served is None:
            return None
        entry = {
            "time": time.time(),
            "response_id": feedback.response_id,
            "model": served[0],
            "variant": served[1],
            "rating": feedback.rating,
            "positive": is_positive(feedback.rating),
            "comment": feedback.comment,
        }
        self.backend.add_rating(served, entry)
        return entry

    def summary(self, controls: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Per model asked for and variant: responses, ratings, positive ratings, preference rate with its 95% Wilson
        interval (`preference_ci95`) and `vs_control`: the comparison with the route's control variant (None for the
        control itself and for requests that went to no route). `controls` maps a route to its control variant;
        a route it does not name takes the variant first served or rated."""
        order, served, counts = self.backend.totals()
        rows: dict[Key, dict[str, Any]] = {}
        for key in order:
            positive, rated = counts.get(key, (0, 0))
            rate = positive / rated if rated else None
            rows[key] = {
                "model": key[0],
                "variant": key[1],
                "responses": served.get(key, 0),
                "ratings": rated,
                "positive": positive,
                "preference_rate": rate,
                "preference_ci95": list(wilson_interval(rate, rated)) if rate is not None else None,
                "vs_control": None,
            }
        for (model, variant), row in rows.items():
            if variant is None:
                continue
            default = next(key[1] for key in order if key[0] == model and key[1] is not None)
            control = (controls or {}).get(model, default)
            if variant != control:
                control_row = rows.get((model, control)) or {"positive": 0, "ratings": 0, "preference_rate": None}
                row["vs_control"] = compare_to_control(row, control_row, control)
        return [rows[key] for key in sorted(rows, key=lambda key: (key[0], key[1] or ""))]


def route_controls(routes: Mapping[str, RouteConfig]) -> dict[str, str]:
    """Each A/B route's control: its first variant in `serve.routes`."""
    return {route: next(iter(settings.variants)) for route, settings in routes.items()}


def compare_to_control(row: dict[str, Any], control_row: dict[str, Any], control: str) -> dict[str, Any]:
    """The variant's preference rate minus the control's (Fisher exact, Newcombe interval) and a verdict."""
    test = two_proportions(row["positive"], row["ratings"], control_row["positive"], control_row["ratings"])
    needed = ratings_needed(control_row["preference_rate"], DETECTABLE_DIFFERENCE)
    comparison = {
        "control": control,
        "difference": test["difference"],
        "ci95": test["ci95"],
        "p_value": test["p_value"],
        "significant": test["significant"],
        "test": test["test"],
        "ratings_needed_per_variant": needed,
    }
    return {
        **comparison,
        "verdict": verdict(row["variant"], control, comparison, row["ratings"], control_row["ratings"]),
    }


def verdict(variant: str, control: str, comparison: dict[str, Any], ratings: int, control_ratings: int) -> str:
    """In words: which variant is better and how sure, or how many more ratings a 10-point difference needs."""
    if not ratings or not control_ratings:
        return f"no ratings yet for {variant if not ratings else control}"
    p = format_p(comparison["p_value"])
    if comparison["significant"]:
        better = variant if comparison["difference"] > 0 else control
        return f"{better} better ({p})"
    more = comparison["ratings_needed_per_variant"] - min(ratings, control_ratings)
    points = round(DETECTABLE_DIFFERENCE * 100)
    if more > 0:
        return f"no significant difference yet ({p}); ~{more} more ratings per variant needed for a {points}-point difference"
    return f"no significant difference ({p}); enough ratings to see a {points}-point difference, so any real one is smaller"


def format_p(p_value: float) -> str:
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"
