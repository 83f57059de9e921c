"""Per-API-key rate limits: a token bucket per key (`serve.rate_limit_per_minute`), refilled continuously. The buckets
live in a `TokenBuckets` store: this process's memory, or Redis when replicas share one limit (`serve.state_url`)."""

from __future__ import annotations

from tuneloop.serve.gateway.stores.base import TokenBuckets
from tuneloop.serve.gateway.stores.local import LocalTokenBuckets


class RateLimiter:
    def __init__(self, per_minute: int | None, buckets: TokenBuckets | None = None) -> None:
        self.capacity = float(per_minute or 0)
        self.rate = (per_minute or 0) / 60.0
        self.buckets = buckets or LocalTokenBuckets()

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        if self.capacity <= 0:
            return True, 0.0
        return self.buckets.take(key, self.capacity, self.rate)
