"""The OpenAI-compatible gateway (FastAPI): builds the shared state, guards /v1/ (API keys, per-key rate limits,
request size) and mounts the per-endpoint routers (routers/)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tuneloop.config import ServeConfig
from tuneloop.error_reporting import close_error_reporting, init_error_reporting
from tuneloop.serve.engines.base import Engine
from tuneloop.serve.gateway.batches import BatchStore
from tuneloop.serve.gateway.errors import install_error_handlers
from tuneloop.serve.gateway.feedback import FeedbackStore
from tuneloop.serve.gateway.limits import RateLimiter
from tuneloop.serve.gateway.metrics import GatewayMetrics
from tuneloop.serve.gateway.protocol import error_body
from tuneloop.serve.gateway.routers import completions, dashboard, feedback, files, health, rate
from tuneloop.serve.gateway.routing import Router
from tuneloop.serve.gateway.serving import CompletionServing
from tuneloop.serve.gateway.state import GatewayState
from tuneloop.serve.gateway.stores.base import TokenBuckets
from tuneloop.serve.gateway.tracing import ServerSpanMiddleware, gateway_tracer
from tuneloop.serve.gateway.traffic import TrafficLog
from tuneloop.workspace import Workspace

log = logging.getLogger("tuneloop.gateway")


def create_app(
    engine: Engine,
    settings: ServeConfig,
    *,
    api_keys: list[str] | None = None,
    context_limit: int | None = None,
    router: Router | None = None,
    feedback_store: FeedbackStore | None = None,
    batch_store: BatchStore | None = None,
    rate_buckets: TokenBuckets | None = None,
    workspace: Workspace | None = None,
    registry: Callable[[], Any] | None = None,
    rubric: dict[str, str] | None = None,
    traffic_log: TrafficLog | None = None,
) -> FastAPI:
    """The gateway over `engine`, bounded by `settings` (request size, max_tokens, rate limit); `api_keys` default to
    `settings.api_keys`, `context_limit` to `settings.max_model_len`. Without stores, feedback is kept in memory and
    the Files/Batches API answers 404, and rate limits are counted in this process unless `rate_buckets` (stores/)
    says where. `rubric` (dimension -> what a 5 means) is what /dashboard/rate asks raters to grade; default
    `eval.rubric`'s. `traffic_log` (serve.log_traffic) logs every served prompt and answer; None: nothing is logged."""
    # Before the routes exist: Sentry's FastAPI integration wraps request handlers as routes are created.
    reporting = init_error_reporting(settings.sentry_dsn, "gateway", settings.sentry_send_content)
    tracer = gateway_tracer(settings, engine)
    router = router or Router({})
    feedback_store = feedback_store or FeedbackStore(None)
    metrics = GatewayMetrics(engine_metrics=settings.engine_metrics)
    serving = CompletionServing(
        engine,
        router,
        feedback_store,
        metrics,
        settings.max_tokens,
        context_limit or settings.max_model_len,
        passthrough=settings.passthrough,
        tracer=tracer,
        traffic=traffic_log,
    )
    state = GatewayState(engine, router, feedback_store, metrics, serving, batch_store, workspace, registry)
    if workspace is not None:
        from prometheus_client import CollectorRegistry

        from tuneloop.monitor.exporter import TrainingCollector

        # A registry of its own: its collector reads the workspace, which /metrics scrapes want and the
        # dashboard's serving statistics (read from metrics.registry) do not.
        state.training_metrics = CollectorRegistry(auto_describe=False)
        state.training_metrics.register(TrainingCollector(workspace, registry))
    limiter = RateLimiter(settings.rate_limit_per_minute, rate_buckets)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        state.ready = True
        takeover = None
        if batch_store is not None:
            batch_store.resume(serving.batch_item)  # a restart loses no batch job
            # Under a shared store (serve.state_url), also the jobs of replicas that died.
            takeover = asyncio.create_task(batch_store.keep_resuming(serving.batch_item))
        log.info("engine %s ready: %s", engine.name, [model.name for model in engine.models()])
        yield
        state.ready = False
        if batch_store is not None and takeover is not None:
            takeover.cancel()
            await batch_store.stop()  # their leases are released: another replica resumes them at once
        await engine.stop()
        tracer.shutdown()  # exports the spans still buffered
        if reporting:
            close_error_reporting()

    app = FastAPI(title="tuneloop gateway", lifespan=lifespan)
    app.state.gateway = state
    app.state.rubric = rubric
    install_error_handlers(app)

    keys = set(settings.api_keys if api_keys is None else api_keys)
    app.add_middleware(GuardMiddleware, api_keys=keys, limiter=limiter, max_request_bytes=settings.max_request_bytes)
    if tracer.enabled:  # outermost: the server span covers the guard's refusals too
        app.add_middleware(ServerSpanMiddleware, tracer=tracer)
    for module in (completions, files, feedback, health, dashboard, rate):
        app.include_router(module.router)
    return app


class GuardMiddleware:
    """API keys, per-key rate limits and the request-size bound on /v1/, as plain ASGI: Starlette's
    `@app.middleware("http")` would relay every streamed chunk through an extra task and memory stream."""

    def __init__(self, app: Any, api_keys: set[str], limiter: RateLimiter, max_request_bytes: int) -> None:
        self.app = app
        self.api_keys = api_keys
        self.limiter = limiter
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(Request(scope))
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        if self.api_keys and (not header.startswith("Bearer ") or header[7:] not in self.api_keys):
            return JSONResponse(
                error_body("invalid or missing API key", "authentication_error", "invalid_api_key"), status_code=401
            )
        allowed, retry_after = self.limiter.allow(header[7:] or (request.client.host if request.client else ""))
        if not allowed:
            return JSONResponse(
                error_body("rate limit reached for this API key", "rate_limit_error", "rate_limit_exceeded"),
                status_code=429,
                headers={"Retry-After": f"{max(1, round(retry_after))}"},
            )
        length = int(request.headers.get("content-length") or 0)
        if length > self.max_request_bytes:
            return JSONResponse(
                error_body(
                    f"request body of {length} bytes exceeds {self.max_request_bytes}",
                    "invalid_request_error",
                    "request_too_large",
                ),
                status_code=413,
            )
        return None
