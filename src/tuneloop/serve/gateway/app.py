"""The OpenAI-compatible gateway (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health, /ready,
/metrics; API keys; OpenAI-style errors (4xx for bad input, never a 5xx)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import Engine, GenerationRequest
from tuneloop.serve.gateway.batches import BATCH_ENDPOINTS, BatchStore
from tuneloop.serve.gateway.feedback import FeedbackRequest, FeedbackStore
from tuneloop.serve.gateway.limits import RateLimiter
from tuneloop.serve.gateway.metrics import GatewayMetrics
from tuneloop.serve.gateway.protocol import (
    BatchRequest,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
)
from tuneloop.serve.gateway.routing import Router

VARIANT_HEADER = "x-tuneloop-variant"

log = logging.getLogger("tuneloop.gateway")


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def create_app(
    engine: Engine,
    api_keys: list[str] | None = None,
    max_request_bytes: int = 1_000_000,
    max_tokens_limit: int = 2048,
    context_limit: int = 8192,
    router: Router | None = None,
    feedback: FeedbackStore | None = None,
    rate_limit_per_minute: int | None = None,
    batch_store: BatchStore | None = None,
) -> FastAPI:
    limiter = RateLimiter(rate_limit_per_minute)
    metrics = GatewayMetrics()
    router = router or Router({})
    feedback = feedback or FeedbackStore(None)
    state: dict[str, Any] = {"ready": False}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        state["ready"] = True
        if batch_store is not None:
            for job in batch_store.unfinished():  # a restart loses no batch job
                batch_store.start(job, run_batch_item)
        log.info("engine %s ready: %s", engine.name, [model.name for model in engine.models()])
        yield
        state["ready"] = False
        await engine.stop()

    app = FastAPI(title="tuneloop gateway", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/"):
            if api_keys:
                header = request.headers.get("authorization", "")
                if not header.startswith("Bearer ") or header[7:] not in api_keys:
                    return JSONResponse(
                        error_body("invalid or missing API key", "authentication_error", "invalid_api_key"),
                        status_code=401,
                    )
            key = request.headers.get("authorization", "")[7:] or (request.client.host if request.client else "")
            allowed, retry_after = limiter.allow(key)
            if not allowed:
                return JSONResponse(
                    error_body("rate limit reached for this API key", "rate_limit_error", "rate_limit_exceeded"),
                    status_code=429,
                    headers={"Retry-After": f"{max(1, round(retry_after))}"},
                )
            length = int(request.headers.get("content-length") or 0)
            if length > max_request_bytes:
                return JSONResponse(
                    error_body(
                        f"request body of {length} bytes exceeds {max_request_bytes}",
                        "invalid_request_error",
                        "request_too_large",
                    ),
                    status_code=413,
                )
        return await call_next(request)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.kind, error.code, error.param), status_code=error.status)

    @app.exception_handler(TuneloopError)
    async def engine_error(_: Request, error: TuneloopError) -> JSONResponse:
        return JSONResponse(error_body(error.message, "server_error", "engine_unavailable"), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{location}: {first.get('msg', 'invalid request')}" if location else str(first.get("msg", error))
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_value", location or None), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine": engine.name, **engine.stats()}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = [
            {"id": model.name, "object": "model", "created": 0, "owned_by": model.owned_by, "parent": model.parent}
            for model in engine.models()
        ]
        routes = [
            {"id": name, "object": "model", "created": 0, "owned_by": "tuneloop-route", "parent": None}
            for name in router.names()
        ]
        return {"object": "list", "data": served + routes}

    @app.post("/v1/batch")
    async def batch(body: BatchRequest) -> dict[str, Any]:
        """Synchronous batch: a list of chat requests processed concurrently; each answer or error in order."""
        import asyncio

        async def one(item: ChatCompletionRequest) -> dict[str, Any]:
            try:
                if item.stream:
                    raise GatewayError(400, "stream is not allowed inside a batch", param="stream")
                served, variant = pick(item)
                generation = to_generation(item, None, served)
                generation.buffered = True
                return {"status": 200, "body": await complete(generation, item, True, variant)}
            except GatewayError as error:
                return {"status": error.status, "body": error_body(error.message, error.kind, error.code, error.param)}
            except TuneloopError as error:
                return {"status": 503, "body": error_body(error.message, "server_error", "engine_unavailable")}

        results = await asyncio.gather(*(one(item) for item in body.requests))
        return {"object": "batch.result", "data": list(results)}

    async def run_batch_item(url: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One line of a batch job, through the same validation, routing and engine as a live request."""
        from pydantic import ValidationError

        try:
            if url not in BATCH_ENDPOINTS:
                raise GatewayError(400, f"unsupported url {url!r} in a batch", param="url")
            chat = url.endswith("chat/completions")
            request = (ChatCompletionRequest if chat else CompletionRequest).model_validate({**body, "stream": False})
            served, variant = pick(request)
            prompt = None if chat else (request.prompt if isinstance(request.prompt, str) else request.prompt[0])
            generation = to_generation(request, prompt, served)
            generation.buffered = True
            return 200, await complete(generation, request, chat, variant)
        except ValidationError as error:
            return 400, error_body(str(error.errors()[0].get("msg")), "invalid_request_error", "invalid_value")
        except GatewayError as error:
            return error.status, error_body(error.message, error.kind, error.code, error.param)
        except TuneloopError as error:
            return 503, error_body(error.message, "server_error", "engine_unavailable")

    def found(value: Any, what: str, identifier: str, param: str) -> Any:
        if value is None:
            raise GatewayError(404, f"no {what} {identifier!r}", param=param)
        return value

    def batches() -> BatchStore:
        if batch_store is None:
            raise GatewayError(404, "the Files and Batches API is not enabled on this gateway")
        return batch_store

    @app.post("/v1/files")
    async def upload_file(file: UploadFile, purpose: str = Form(...)) -> dict[str, Any]:
        content = await file.read()
        if purpose == "batch":
            for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError:
                        raise GatewayError(400, f"line {number} of {file.filename} is not JSON", param="file") from None
        return batches().add_file(file.filename or "upload.jsonl", purpose, content)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        return found(batches().file(file_id), "file", file_id, "file_id")

    @app.get("/v1/files/{file_id}/content")
    async def get_file_content(file_id: str) -> Any:
        from fastapi.responses import Response

        content = found(batches().file_content(file_id), "file", file_id, "file_id")
        return Response(content, media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        body = await request.json()
        store = batches()
        if body.get("endpoint") not in BATCH_ENDPOINTS:
            raise GatewayError(400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", param="endpoint")
        if store.file(str(body.get("input_file_id"))) is None:
            raise GatewayError(400, f"no file {body.get('input_file_id')!r}", param="input_file_id")
        job = store.create(
            body["input_file_id"], body["endpoint"], body.get("completion_window", "24h"), body.get("metadata")
        )
        store.start(job, run_batch_item)
        return job

    @app.get("/v1/batches")
    async def list_batches() -> dict[str, Any]:
        return {"object": "list", "data": batches().all(), "has_more": False}

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return found(batches().get(batch_id), "batch", batch_id, "batch_id")

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        store = batches()
        job = found(store.get(batch_id), "batch", batch_id, "batch_id")
        if job["status"] in ("validating", "in_progress"):
            job["status"] = "cancelling"
            store.save(job)
        return job

    @app.post("/v1/feedback")
    async def post_feedback(body: FeedbackRequest) -> dict[str, Any]:
        entry = feedback.record(body)
        if entry is None:
            raise GatewayError(
                404, f"no response with id {body.response_id!r}", code="response_not_found", param="response_id"
            )
        return {"object": "feedback", **entry}

    @app.get("/v1/feedback/summary")
    async def feedback_summary() -> dict[str, Any]:
        return {"object": "list", "data": feedback.summary()}

    def pick(body: ChatCompletionRequest | CompletionRequest) -> tuple[str, str | None]:
        """The served model for the request (an A/B route picks a variant), or a 404."""
        served, variant = router.choose(body.model, body.user)
        if served not in {model.name for model in engine.models()}:
            raise GatewayError(
                404, f"The model `{body.model}` does not exist.", "invalid_request_error", "model_not_found", "model"
            )
        return served, variant

    def to_generation(
        body: ChatCompletionRequest | CompletionRequest, prompt: str | None, served: str
    ) -> GenerationRequest:
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        if max_tokens > max_tokens_limit:
            raise GatewayError(400, f"max_tokens must be <= {max_tokens_limit}", param="max_tokens")
        messages = (
            [{"role": m.role, "content": m.text()} for m in body.messages]
            if isinstance(body, ChatCompletionRequest)
            else None
        )
        size = len(prompt or "") + sum(len(m["content"]) for m in messages or [])
        if size > context_limit * 8:  # a cheap character bound before tokenization
            raise GatewayError(
                400,
                f"the prompt is too long for this model's context ({context_limit} tokens)",
                code="context_length_exceeded",
                param="messages" if messages else "prompt",
            )
        return GenerationRequest(
            model=served,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
        )

    def respond(
        generation: GenerationRequest, body: Any, chat: bool, variant: str | None, result: dict[str, Any] | None = None
    ) -> Any:
        headers = {VARIANT_HEADER: variant} if variant else {}
        if result is None:
            return StreamingResponse(
                stream(generation, body, chat, variant), media_type="text/event-stream", headers=headers
            )
        return JSONResponse(result, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        served, variant = pick(body)
        generation = to_generation(body, None, served)
        generation.buffered = not body.stream
        if body.stream:
            if body.n != 1:
                raise GatewayError(400, "n > 1 cannot be streamed yet; drop stream or n", param="n")
            return respond(generation, body, True, variant)
        if body.n == 1:
            return respond(generation, body, True, variant, await complete(generation, body, True, variant))
        import asyncio
        from dataclasses import replace

        # n choices: n generations, run concurrently so the engine batches them; distinct seeds when sampling.
        runs = [replace(generation, seed=None if body.seed is None else body.seed + index) for index in range(body.n)]
        results = await asyncio.gather(*(complete(run, body, True, variant) for run in runs))
        merged = results[0]
        merged["choices"] = [{**result["choices"][0], "index": index} for index, result in enumerate(results)]
        merged["usage"] = {
            "prompt_tokens": results[0]["usage"]["prompt_tokens"],
            "completion_tokens": sum(result["usage"]["completion_tokens"] for result in results),
        }
        merged["usage"]["total_tokens"] = merged["usage"]["prompt_tokens"] + merged["usage"]["completion_tokens"]
        return respond(generation, body, True, variant, merged)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        served, variant = pick(body)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise GatewayError(400, "send one prompt per request", param="prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        generation = to_generation(body, prompt, served)
        if body.logprobs is not None:
            return respond(generation, body, False, variant, await scored(generation, body, prompt))
        generation.buffered = not body.stream
        if body.stream:
            return respond(generation, body, False, variant)
        result = await complete(generation, body, False, variant)
        if body.echo:
            result["choices"][0]["text"] = prompt + result["choices"][0]["text"]
        return respond(generation, body, False, variant, result)

    async def scored(generation: GenerationRequest, body: CompletionRequest, prompt: str) -> dict[str, Any]:
        """Completions with logprobs (and echo): lm-evaluation-harness's `local-completions` scoring path."""
        if body.stream:
            raise GatewayError(400, "logprobs with stream is not supported", param="stream")
        try:
            result = await engine.score(generation.model, prompt, body.max_tokens or 0, body.logprobs or 0, body.echo)
        except NotImplementedError as error:
            raise GatewayError(400, str(error), param="logprobs") from None
        text = (prompt + result["text"]) if body.echo else result["text"]
        usage = {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }
        metrics.requests.labels(model=body.model, variant=generation.model, status="success").inc()
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": generation.model,
            "choices": [
                {"index": 0, "text": text, "finish_reason": result["finish_reason"], "logprobs": result["logprobs"]}
            ],
            "usage": usage,
        }

    async def run(generation: GenerationRequest, asked: str) -> AsyncIterator[Any]:
        labels = {"model": asked, "variant": generation.model}
        started = time.perf_counter()
        first = last = None
        metrics.running.inc()
        status = "error"
        try:
            async for chunk in engine.generate(generation):
                moment = time.perf_counter()
                if chunk.text:
                    if first is None:
                        first = moment
                        metrics.time_to_first_token.labels(**labels).observe(moment - started)
                    elif last is not None:
                        metrics.inter_token_latency.labels(**labels).observe(moment - last)
                    last = moment
                if chunk.finish_reason:
                    metrics.prompt_tokens.labels(**labels).inc(chunk.prompt_tokens)
                    metrics.generation_tokens.labels(**labels).inc(chunk.completion_tokens)
                yield chunk
            status = "success"
        finally:
            metrics.running.dec()
            metrics.requests.labels(status=status, **labels).inc()
            metrics.e2e_latency.labels(**labels).observe(time.perf_counter() - started)
            log.info(
                json.dumps(
                    {
                        "event": "request",
                        "model": asked,
                        "variant": generation.model,
                        "status": status,
                        "seconds": round(time.perf_counter() - started, 4),
                    }
                )
            )

    async def complete(generation: GenerationRequest, body: Any, chat: bool, variant: str | None) -> dict[str, Any]:
        text, final = "", None
        identifier = new_id("chatcmpl" if chat else "cmpl")
        feedback.served_response(identifier, body.model, variant)
        async for chunk in run(generation, body.model):
            text += chunk.text
            if chunk.finish_reason:
                final = chunk
        assert final is not None
        usage = {
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
        }
        if chat:
            return {
                "id": identifier,
                "object": "chat.completion",
                "created": now(),
                "model": generation.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": final.finish_reason,
                    }
                ],
                "usage": usage,
            }
        return {
            "id": identifier,
            "object": "text_completion",
            "created": now(),
            "model": generation.model,
            "choices": [{"index": 0, "text": text, "finish_reason": final.finish_reason, "logprobs": None}],
            "usage": usage,
        }

    async def stream(generation: GenerationRequest, body: Any, chat: bool, variant: str | None) -> AsyncIterator[str]:
        """Server-sent events exactly as OpenAI sends them: role first, finish_reason last, optional usage, [DONE]."""
        identifier, created = new_id("chatcmpl" if chat else "cmpl"), now()
        feedback.served_response(identifier, body.model, variant)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {
                "id": identifier,
                "object": kind,
                "created": created,
                "model": generation.model,
                "choices": [choice] if choice else [],
            }
            if body.include_usage():
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for chunk in run(generation, body.model):
            if chunk.text:
                delta = {"delta": {"content": chunk.text}} if chat else {"text": chunk.text}
                yield event({"index": 0, **delta, "finish_reason": None})
            if chunk.finish_reason:
                last = {"delta": {}} if chat else {"text": ""}
                yield event({"index": 0, **last, "finish_reason": chunk.finish_reason})
                if body.include_usage():
                    yield event(
                        None,
                        {
                            "prompt_tokens": chunk.prompt_tokens,
                            "completion_tokens": chunk.completion_tokens,
                            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
                        },
                    )
        yield "data: [DONE]\n\n"

    return app
