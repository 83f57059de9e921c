"""The gateway's state stores, chosen by `serve.state_url`: unset, this process and the workspace's `serve/` folder
(local.py); `redis://HOST:PORT/DB`, one Redis shared by every gateway replica (redis_backend.py). The interfaces are
in base.py; rate limits, batches and feedback (limits.py, batches.py, feedback.py) are written against them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneloop.errors import TuneloopError
from tuneloop.serve.gateway.stores.base import DEFAULT_LEASE_S, TokenBuckets
from tuneloop.workspace import ServePaths

if TYPE_CHECKING:
    from tuneloop.serve.gateway.batches import BatchStore
    from tuneloop.serve.gateway.feedback import FeedbackStore

LEASE_ENV = "TUNELOOP_STATE_LEASE_S"  # seconds a replica's claim on a batch job lasts (tests shorten it)


@dataclass
class GatewayStores:
    buckets: TokenBuckets
    feedback: FeedbackStore
    batches: BatchStore


def open_stores(state_url: str | None, paths: ServePaths, batch_concurrency: int = 64) -> GatewayStores:
    """The stores for `serve.state_url` (None: local); a batch job runs `batch_concurrency` requests at once. Redis is reached once here, so a wrong URL or a server that
    is not up stops `tuneloop serve` at start with a TuneloopError naming the field."""
    from tuneloop.serve.gateway.batches import BatchStore
    from tuneloop.serve.gateway.feedback import FeedbackStore

    lease_s = lease_seconds()
    if not state_url:
        from tuneloop.serve.gateway.stores.local import LocalTokenBuckets

        return GatewayStores(
            LocalTokenBuckets(), FeedbackStore(paths.feedback), BatchStore(paths, batch_concurrency, lease_s)
        )
    from tuneloop.serve.gateway.stores.redis_backend import RedisBatchFiles, RedisFeedback, RedisTokenBuckets, connect

    client = connect(state_url)
    return GatewayStores(
        RedisTokenBuckets(client),
        FeedbackStore(RedisFeedback(client)),
        BatchStore(RedisBatchFiles(client), batch_concurrency, lease_s),
    )


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return DEFAULT_LEASE_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise TuneloopError(
            f"{LEASE_ENV}={raw!r} is not a positive number of seconds", hint=f"unset it ({DEFAULT_LEASE_S:.0f} s)"
        )
    return seconds
