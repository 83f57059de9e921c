"""What the gateway's routers share: the engine, routing, stores, metrics and the completion logic."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tuneloop.serve.engines.base import Engine
from tuneloop.serve.gateway.batches import BatchStore
from tuneloop.serve.gateway.errors import GatewayError
from tuneloop.serve.gateway.feedback import FeedbackStore
from tuneloop.serve.gateway.metrics import GatewayMetrics
from tuneloop.serve.gateway.routing import Router
from tuneloop.serve.gateway.serving import CompletionServing
from tuneloop.workspace import Workspace


@dataclass
class GatewayState:
    engine: Engine
    router: Router
    feedback: FeedbackStore
    metrics: GatewayMetrics
    serving: CompletionServing
    batch_store: BatchStore | None = None
    workspace: Workspace | None = None  # runs for the dashboard
    registry: Callable[[], Any] | None = None  # opens the model registry (dashboard, eval gauges)
    training_metrics: Any = None  # a prometheus CollectorRegistry with the workspace's training/eval gauges
    ready: bool = False
    started_at: float = field(default_factory=time.time)

    def batches(self) -> BatchStore:
        if self.batch_store is None:
            raise GatewayError(404, "the Files and Batches API is not enabled on this gateway")
        return self.batch_store


def gateway(request: Request) -> GatewayState:
    """FastAPI dependency: the state of the gateway serving this request."""
    return request.app.state.gateway
