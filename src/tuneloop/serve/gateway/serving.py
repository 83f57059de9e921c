"""The logic behind /v1/chat/completions and /v1/completions (and the batch endpoints that reuse it): route the
`model` to a served model (A/B variant included), bound the request, run it on the engine with metrics and a
structured log line, and shape the answer as OpenAI does, streamed (SSE) or not, for one or `n` choices."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from tuneloop.error_reporting import report_exception
from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import Engine, GenerationChunk, GenerationRequest
from tuneloop.serve.gateway.batches import BATCH_ENDPOINTS
from tuneloop.serve.gateway.errors import GatewayError, engine_unavailable
from tuneloop.serve.gateway.feedback import FeedbackStore
from tuneloop.serve.gateway.metrics import GatewayMetrics
from tuneloop.serve.gateway.protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now
from tuneloop.serve.gateway.routing import Router
from tuneloop.serve.gateway.tracing import NO_TRACING, GenerationTrace, RequestTracer
from tuneloop.serve.gateway.traffic import PassthroughCapture, TrafficLog

log = logging.getLogger("tuneloop.gateway")

AnyRequest = ChatCompletionRequest | CompletionRequest
# What a request that names no max_tokens gets (bounded by serve.max_tokens).
DEFAULT_MAX_TOKENS = 256
# Pass-through streams are read, not parsed: an event with non-empty text (TTFT, inter-token gaps), the response id,
# and the usage event (the one event that is parsed).
# Compact JSON (vLLM, llama-server) or spaced (Python's json.dumps: another tuneloop gateway as a replica).
_TEXT_EVENT = re.compile(rb'"(?:content|text)": ?"[^"]')
_RESPONSE_ID = re.compile(rb'"id": ?"([^"]+)"')
_USAGE = re.compile(rb'"usage": ?\{')


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class CompletionServing:
    def __init__(
        self,
        engine: Engine,
        router: Router,
        feedback: FeedbackStore,
        metrics: GatewayMetrics,
        max_tokens_limit: int,
        context_limit: int,
        passthrough: bool = True,
        tracer: RequestTracer = NO_TRACING,
        traffic: TrafficLog | None = None,
    ) -> None:
        self.engine = engine
        self.traffic = traffic  # serve.log_traffic: prompts and answers appended to serve/traffic.jsonl
        self.passthrough = passthrough
        self.tracer = tracer
        self.router = router
        self.feedback = feedback
        self.metrics = metrics
        self.max_tokens_limit = max_tokens_limit
        self.context_limit = context_limit

    # -- request → engine -------------------------------------------------------------------------------------------
    def pick(self, body: AnyRequest) -> tuple[str, str | None]:
        """The served model for the request (an A/B route picks a variant), or a 404."""
        served, variant = self.router.choose(body.model, body.user)
        if served not in {model.name for model in self.engine.models()}:
            raise GatewayError(
                404, f"The model `{body.model}` does not exist.", "invalid_request_error", "model_not_found", "model"
            )
        self.tracer.route(body.model, served, variant)
        return served, variant

    def to_generation(self, body: AnyRequest, prompt: str | None, served: str) -> GenerationRequest:
        asked = next((value for value in (body.max_completion_tokens, body.max_tokens) if value is not None), None)
        max_tokens = asked if asked is not None else min(DEFAULT_MAX_TOKENS, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise GatewayError(400, f"max_tokens must be <= {self.max_tokens_limit}", param="max_tokens")
        messages = (
            [{"role": m.role, "content": m.text()} for m in body.messages]
            if isinstance(body, ChatCompletionRequest)
            else None
        )
        size = len(prompt or "") + sum(len(m["content"]) for m in messages or [])
        if size > self.context_limit * 8:  # a cheap character bound before tokenization
            raise GatewayError(
                400,
                f"the prompt is too long for this model's context ({self.context_limit} tokens)",
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
            buffered=not body.stream,
        )

    @staticmethod
    def single_prompt(body: CompletionRequest) -> str:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise GatewayError(400, "send one prompt per request", param="prompt")
            return body.prompt[0]
        return body.prompt

    @staticmethod
    def choices(generation: GenerationRequest, n: int) -> list[GenerationRequest]:
        """n generations of one request; distinct seeds when a seed was given, so sampled choices differ."""
        return [
            replace(generation, seed=None if generation.seed is None else generation.seed + index) for index in range(n)
        ]

    async def run(self, generation: GenerationRequest, asked: str) -> AsyncIterator[GenerationChunk]:
        """The engine's chunks, with TTFT / inter-token / end-to-end metrics, token counters, a trace span and a log
        line; a failure is reported (Sentry, when configured)."""
        metrics = self.metrics
        labels = {"model": asked, "variant": generation.model}
        started = time.perf_counter()
        first = last = None
        metrics.running.inc()
        status = "error"
        trace = self.tracer.generation(generation)
        try:
            async for chunk in self.engine.generate(generation):
                moment = time.perf_counter()
                if chunk.text:
                    trace.add_text(chunk.text)
                    if first is None:
                        first = moment
                        trace.first_token()
                        metrics.time_to_first_token.labels(**labels).observe(moment - started)
                    elif last is not None:
                        metrics.inter_token_latency.labels(**labels).observe(moment - last)
                    last = moment
                if chunk.finish_reason:
                    trace.finish(chunk.prompt_tokens, chunk.completion_tokens, chunk.finish_reason)
                    metrics.prompt_tokens.labels(**labels).inc(chunk.prompt_tokens)
                    metrics.generation_tokens.labels(**labels).inc(chunk.completion_tokens)
                yield chunk
            status = "success"
        except Exception as error:
            self._failed(error, trace, generation, asked)
            raise
        finally:
            trace.end()
            self._done(labels, started, status)

    def _failed(self, error: Exception, trace: GenerationTrace, generation: GenerationRequest, asked: str) -> None:
        """An engine failure on the request's span and to Sentry, with what the client saw (a 503, a 500, or an
        error event in a stream already under way) and never the prompt."""
        trace.fail(error)
        seen = "stream_error" if not generation.buffered else "503" if isinstance(error, TuneloopError) else "500"
        report_exception(error, model=asked, variant=generation.model, engine=self.engine.name, status=seen)

    def _done(self, labels: dict[str, str], started: float, status: str) -> None:
        """A request's end: counters, end-to-end latency and its structured log line."""
        seconds = time.perf_counter() - started
        self.metrics.running.dec()
        self.metrics.requests.labels(status=status, **labels).inc()
        self.metrics.e2e_latency.labels(**labels).observe(seconds)
        log.info(
            json.dumps(
                {
                    "event": "request",
                    "model": labels["model"],
                    "variant": labels["variant"],
                    "status": status,
                    "seconds": round(seconds, 4),
                }
            )
        )

    # -- whole answers ----------------------------------------------------------------------------------------------
    async def complete(self, generation: GenerationRequest, body: AnyRequest, chat: bool, variant: str | None) -> dict:
        """The non-streamed answer with `body.n` choices (run concurrently, so the engine batches them)."""
        identifier = new_id("chatcmpl" if chat else "cmpl")
        self.feedback.served_response(identifier, body.model, variant)

        async def one(run: GenerationRequest) -> tuple[str, GenerationChunk]:
            text, final = "", None
            async for chunk in self.run(run, body.model):
                text += chunk.text
                if chunk.finish_reason:
                    final = chunk
            assert final is not None
            return text, final

        answers = await asyncio.gather(*(one(run) for run in self.choices(generation, body.n)))
        if self.traffic is not None:
            totals = replace(answers[0][1], completion_tokens=sum(final.completion_tokens for _, final in answers))
            self.traffic.record(identifier, body.model, variant, generation, [text for text, _ in answers], totals)
        if chat:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": final.finish_reason}
                for i, (text, final) in enumerate(answers)
            ]
        else:
            echo = self.single_prompt(body) if isinstance(body, CompletionRequest) and body.echo else ""
            choices = [
                {"index": i, "text": echo + text, "finish_reason": final.finish_reason, "logprobs": None}
                for i, (text, final) in enumerate(answers)
            ]
        return {
            "id": identifier,
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": generation.model,
            "choices": choices,
            "usage": usage_of(answers[0][1].prompt_tokens, sum(final.completion_tokens for _, final in answers)),
        }

    async def scored(self, generation: GenerationRequest, body: CompletionRequest, prompt: str) -> dict[str, Any]:
        """Completions with logprobs (and echo): lm-evaluation-harness's `local-completions` scoring path."""
        if body.stream:
            raise GatewayError(400, "logprobs with stream is not supported", param="stream")
        try:
            result = await self.engine.score(
                generation.model, prompt, body.max_tokens or 0, body.logprobs or 0, body.echo
            )
        except NotImplementedError as error:
            raise GatewayError(400, str(error), param="logprobs") from None
        text = (prompt + result["text"]) if body.echo else result["text"]
        self.metrics.requests.labels(model=body.model, variant=generation.model, status="success").inc()
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": generation.model,
            "choices": [
                {"index": 0, "text": text, "finish_reason": result["finish_reason"], "logprobs": result["logprobs"]}
            ],
            "usage": usage_of(result["prompt_tokens"], result["completion_tokens"]),
        }

    # -- streams ----------------------------------------------------------------------------------------------------
    async def stream(
        self, generation: GenerationRequest, body: AnyRequest, chat: bool, variant: str | None
    ) -> AsyncIterator[str | bytes]:
        """Server-sent events exactly as OpenAI sends them: per choice the role first and finish_reason last, chunks
        of the `n` choices interleaved as they come, optional usage, then [DONE]."""
        if self.passes_through(body):
            async for events in self._passthrough(generation, body, variant):
                yield events
            return
        identifier, created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.feedback.served_response(identifier, body.model, variant)
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = body.include_usage()
        # Only `choices` and `usage` change between events: the rest is serialised once.
        head = json.dumps({"id": identifier, "object": kind, "created": created, "model": generation.model})[:-1]

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            tail = f', "usage": {json.dumps(usage)}' if include_usage else ""
            return f'data: {head}, "choices": {json.dumps([choice] if choice else [])}{tail}}}\n\n'

        runs = self.choices(generation, body.n)
        if chat:
            for index in range(len(runs)):
                yield event({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        prompt_tokens = completion_tokens = 0
        texts: list[list[str]] | None = [[] for _ in runs] if self.traffic is not None else None
        finish_reason = None
        try:
            async for index, chunk in self._merged(runs, body.model):
                if texts is not None:
                    texts[index].append(chunk.text)
                    if index == 0 and chunk.finish_reason:
                        finish_reason = chunk.finish_reason
                if chunk.text:
                    delta = {"delta": {"content": chunk.text}} if chat else {"text": chunk.text}
                    yield event({"index": index, **delta, "finish_reason": None})
                if chunk.finish_reason:
                    last = {"delta": {}} if chat else {"text": ""}
                    yield event({"index": index, **last, "finish_reason": chunk.finish_reason})
                    prompt_tokens = chunk.prompt_tokens
                    completion_tokens += chunk.completion_tokens
        except Exception as error:  # the headers are sent: say it in the stream, as vLLM does, then end it
            log.warning("stream %s failed: %s", identifier, error)
            yield f"data: {json.dumps(error_body(str(error), 'server_error', 'engine_error'))}\n\n"
            yield "data: [DONE]\n\n"
            return
        if self.traffic is not None and texts is not None:
            answers = ["".join(pieces) for pieces in texts]
            totals = GenerationChunk("", finish_reason, prompt_tokens, completion_tokens)
            self.traffic.record(identifier, body.model, variant, generation, answers, totals, stream=True)
        if include_usage:
            yield event(None, usage_of(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"

    def passes_through(self, body: AnyRequest) -> bool:
        """Whether the engine's own stream can reach the client as it is: an HTTP engine, one choice and no `echo`
        (the gateway's only rewrites of a stream's content). Measured on 2 cores, vLLM float32, 32 users, relay on
        aiohttp: 0.986x direct tokens/s passed through vs 0.981x parsed (docs/benchmarks.md)."""
        echo = isinstance(body, CompletionRequest) and body.echo
        return self.passthrough and self.engine.passthrough and body.n == 1 and not echo

    async def _passthrough(
        self, generation: GenerationRequest, body: AnyRequest, variant: str | None
    ) -> AsyncIterator[bytes]:
        """The engine's server-sent events forwarded as bytes, with the same metrics and log line as `run`: TTFT at
        the first event with text, tokens from the engine's usage event (dropped when the client did not ask for
        usage), the response id the engine gave (so feedback can name it)."""
        metrics = self.metrics
        labels = {"model": body.model, "variant": generation.model}
        include_usage = body.include_usage()
        started = time.perf_counter()
        first = last = None
        identified = False
        metrics.running.inc()
        status = "error"
        trace = self.tracer.generation(generation)
        # Parsing the events for the answer's text costs only when the traffic log is on.
        capture = PassthroughCapture() if self.traffic is not None else None
        identifier = ""
        try:
            async for events in self.engine.stream_events(generation):
                moment = time.perf_counter()
                trace.read_events(events)
                if capture is not None:
                    capture.read(events)
                if not identified:
                    identified = True
                    found = _RESPONSE_ID.search(events)
                    identifier = found.group(1).decode() if found else new_id("chatcmpl")
                    self.feedback.served_response(identifier, body.model, variant)
                if _TEXT_EVENT.search(events):
                    if first is None:
                        first = moment
                        trace.first_token()
                        metrics.time_to_first_token.labels(**labels).observe(moment - started)
                    elif last is not None:
                        metrics.inter_token_latency.labels(**labels).observe(moment - last)
                    last = moment
                if _USAGE.search(events):
                    events = self._count_usage(events, labels, include_usage, trace)
                if events:
                    yield events
            status = "success"
            if capture is not None and self.traffic is not None:
                answer, totals = capture.answer, capture.totals
                self.traffic.record(
                    identifier, body.model, variant, generation, [answer], totals, stream=True, passthrough=True
                )
        except Exception as error:  # the headers are sent: say it in the stream, as vLLM does, then end it
            log.warning("stream for %s failed: %s", body.model, error)
            self._failed(error, trace, generation, body.model)
            yield f"data: {json.dumps(error_body(str(error), 'server_error', 'engine_error'))}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            trace.end()
            self._done(labels, started, status)

    def _count_usage(self, events: bytes, labels: dict[str, str], include_usage: bool, trace: GenerationTrace) -> bytes:
        """Count the tokens of the usage event among `events`; drop that event when the client did not ask for it
        and it carries no choice (the gateway asked the engine for usage on the client's behalf)."""
        kept = []
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: ") and _USAGE.search(event):
                chunk = json.loads(event[6:])
                usage = chunk.get("usage") or {}
                trace.finish(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                self.metrics.prompt_tokens.labels(**labels).inc(usage.get("prompt_tokens", 0))
                self.metrics.generation_tokens.labels(**labels).inc(usage.get("completion_tokens", 0))
                if not include_usage and not chunk.get("choices"):
                    continue
            kept.append(event)
        return b"\n\n".join(kept)

    async def _merged(self, runs: list[GenerationRequest], asked: str) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """The chunks of several generations as they arrive, tagged with the choice index."""
        if len(runs) == 1:
            async for chunk in self.run(runs[0], asked):
                yield 0, chunk
            return
        queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, run: GenerationRequest) -> None:
            try:
                async for chunk in self.run(run, asked):
                    await queue.put((index, chunk))
                await queue.put((index, None))
            except BaseException as error:  # handed to the consumer, which re-raises it
                await queue.put((index, error))

        tasks = [asyncio.create_task(pump(index, run)) for index, run in enumerate(runs)]
        try:
            remaining = len(runs)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    # -- batch items ------------------------------------------------------------------------------------------------
    async def batch_item(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One request of a batch (sync /v1/batch or a Batches API job), through the same validation, routing and
        engine as a live request; errors become the item's status and OpenAI error body."""
        try:
            if url not in BATCH_ENDPOINTS:
                raise GatewayError(400, f"unsupported url {url!r} in a batch", param="url")
            if body.get("stream"):
                raise GatewayError(400, "stream is not allowed inside a batch", param="stream")
            chat = url.endswith("chat/completions")
            request = (ChatCompletionRequest if chat else CompletionRequest).model_validate({**body, "stream": False})
            served, variant = self.pick(request)
            prompt = None if isinstance(request, ChatCompletionRequest) else self.single_prompt(request)
            generation = self.to_generation(request, prompt, served)
            return 200, await self.complete(generation, request, chat, variant)
        except ValidationError as error:
            return 400, error_body(str(error.errors()[0].get("msg")), "invalid_request_error", "invalid_value")
        except GatewayError as error:
            return error.status, error.body()
        except TuneloopError as error:
            return 503, engine_unavailable(error)
