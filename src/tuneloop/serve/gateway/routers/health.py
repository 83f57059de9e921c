"""Routes for operators: /health (engine counters), /ready (200 once models are loaded), /metrics (Prometheus: the
gateway's series, GPU gauges, the workspace's training/eval gauges and the engine's own series)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tuneloop.serve.gateway.engine_metrics import scrape_engines
from tuneloop.serve.gateway.state import GatewayState, gateway

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    return {"status": "ok", "engine": state.engine.name, **state.engine.stats()}


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


@router.get("/metrics")
async def prometheus(state: State) -> PlainTextResponse:
    metrics = state.metrics
    engine = ""
    if metrics.engine_metrics:  # first: a failed engine scrape is counted in this very exposition
        engine = await scrape_engines(
            state.engine.metrics_sources(), lambda url: metrics.engine_metrics_failures.labels(url).inc()
        )
    text = generate_latest(metrics.registry) + generate_latest(metrics.system)
    if state.training_metrics is not None:
        text += generate_latest(state.training_metrics)
    return PlainTextResponse(text.decode() + engine, media_type=CONTENT_TYPE_LATEST)
