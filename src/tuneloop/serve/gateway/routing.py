"""A/B splits: which variant (served model) answers a request for a route, sticky per `user` when asked."""

from __future__ import annotations

import hashlib
import random

from tuneloop.config import RouteConfig


class Router:
    def __init__(self, routes: dict[str, RouteConfig], seed: int = 0) -> None:
        self.routes = routes
        self.random = random.Random(seed)

    def names(self) -> list[str]:
        return list(self.routes)

    def variants(self) -> set[str]:
        return {variant for route in self.routes.values() for variant in route.variants}

    def choose(self, model: str, user: str | None) -> tuple[str, str | None]:
        """(served model, variant) for a request; variant is None when `model` is not a route."""
        route = self.routes.get(model)
        if route is None:
            return model, None
        if route.sticky and user:
            digest = hashlib.sha256(f"{model}\x00{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = self.random.random()
        total = sum(route.variants.values())
        cumulative = 0.0
        for variant, weight in route.variants.items():
            cumulative += weight / total
            if point < cumulative:
                return variant, variant
        # Float sums can end just below 1: fall back to the last variant that has a weight.
        last = [variant for variant, weight in route.variants.items() if weight > 0][-1]
        return last, last
