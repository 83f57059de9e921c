"""Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/batch (synchronous)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from tuneloop.serve.gateway.protocol import BatchRequest, ChatCompletionRequest, CompletionRequest
from tuneloop.serve.gateway.state import GatewayState, gateway

VARIANT_HEADER = "x-tuneloop-variant"

router = APIRouter()
State = Annotated[GatewayState, Depends(gateway)]


def _headers(variant: str | None) -> dict[str, str]:
    return {VARIANT_HEADER: variant} if variant else {}


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, state: State) -> Any:
    serving = state.serving
    served, variant = serving.pick(body)
    generation = serving.to_generation(body, None, served)
    if body.stream:
        events = serving.stream(generation, body, True, variant)
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers(variant))
    return JSONResponse(await serving.complete(generation, body, True, variant), headers=_headers(variant))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: State) -> Any:
    serving = state.serving
    served, variant = serving.pick(body)
    prompt = serving.single_prompt(body)
    generation = serving.to_generation(body, prompt, served)
    if body.logprobs is not None:
        return JSONResponse(await serving.scored(generation, body, prompt), headers=_headers(variant))
    if body.stream:
        events = serving.stream(generation, body, False, variant)
        return StreamingResponse(events, media_type="text/event-stream", headers=_headers(variant))
    return JSONResponse(await serving.complete(generation, body, False, variant), headers=_headers(variant))


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    served = [
        {"id": model.name, "object": "model", "created": 0, "owned_by": model.owned_by, "parent": model.parent}
        for model in state.engine.models()
    ]
    routes = [
        {"id": name, "object": "model", "created": 0, "owned_by": "tuneloop-route", "parent": None}
        for name in state.router.names()
    ]
    return {"object": "list", "data": served + routes}


@router.post("/v1/batch")
async def batch(body: BatchRequest, state: State) -> dict[str, Any]:
    """Synchronous batch: a list of chat requests processed concurrently; each answer or error in order."""
    items = [item.model_dump(exclude_none=True) for item in body.requests]
    results = await asyncio.gather(*(state.serving.batch_item("/v1/chat/completions", item) for item in items))
    return {"object": "batch.result", "data": [{"status": status, "body": answer} for status, answer in results]}
