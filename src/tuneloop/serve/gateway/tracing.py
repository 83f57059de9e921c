"""OpenTelemetry traces of the gateway, exported over OTLP/HTTP to `serve.otlp_endpoint` (a Collector, Jaeger, Tempo,
Langfuse). Per request a span tree:

    POST /v1/chat/completions   (server: method, path, route, status code)
    ├── route                   (the model asked, the served model, the A/B variant chosen)
    └── chat {model}            (client, GenAI semantic conventions: engine, model, max_tokens, tokens in/out,
                                 time to first token, adapter, finish reason, error status; prompt and answer only
                                 with `serve.trace_content`)

The gateway has a tracer provider of its own (not OpenTelemetry's global one), so several gateways in one process
export to their own endpoints; `shutdown` flushes it when the gateway stops. Without an endpoint, `gateway_tracer`
returns NO_TRACING, whose calls do nothing: OpenTelemetry is not imported and no span object is made.

The request path calls `route(...)` once the model is resolved, and per engine call `trace = generation(request)`,
then `first_token()` on the first text, `finish(...)` with the final token counts (the last chunk, or the usage event
of a pass-through stream), `fail(error)` on a failure and `end()` in a `finally`: the parsed and the pass-through
streams alike.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tuneloop import __version__
from tuneloop.errors import TuneloopError

if TYPE_CHECKING:
    from tuneloop.config import ServeConfig
    from tuneloop.serve.engines.base import Engine, GenerationRequest

SERVICE_NAME = "tuneloop-gateway"
TRACES_PATH = "/v1/traces"
# Only the API is traced: /metrics scrapes and /health probes would bury the requests.
TRACED_PREFIX = "/v1/"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of `serve.otlp_endpoint`: `/v1/traces` appended unless already there."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class GenerationTrace:
    """One engine call's span, from `RequestTracer.generation` to `end()`; this base class records nothing (tracing
    off), so the request path calls it unconditionally."""

    content = False  # whether prompts and answers go on the span (serve.trace_content)

    def first_token(self) -> None:
        """The first text arrived (time to first token)."""

    def add_text(self, text: str) -> None:
        """Parsed path: a piece of the answer (kept only with `content`)."""

    def read_events(self, events: bytes) -> None:
        """Pass-through path: the engine's server-sent events; their text is kept only with `content`."""

    def finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None = None) -> None:
        """The engine's final counts (the last chunk, or the usage event of a pass-through stream)."""

    def fail(self, error: BaseException) -> None:
        """The engine call failed (raised, or ended a stream with an error event)."""

    def end(self) -> None:
        """Close the span (always, in a `finally`); neither finished nor failed means the client went away."""


class RequestTracer:
    """The gateway's tracer; this base class is NO_TRACING: every call is a no-op."""

    enabled = False
    _idle = GenerationTrace()

    def route(self, asked: str, served: str, variant: str | None) -> None:
        """`asked` (a model or an A/B route) resolved to the served model `served` (`variant` when A/B)."""

    def generation(self, request: GenerationRequest) -> GenerationTrace:
        """The span of one engine call, started now; the caller ends it with `end()`."""
        return self._idle

    def shutdown(self) -> None:
        """Export what is buffered and stop (gateway stop)."""


NO_TRACING = RequestTracer()


def gateway_tracer(settings: ServeConfig, engine: Engine) -> RequestTracer:
    """OTLP tracing per `serve.otlp_endpoint` (headers `serve.otlp_headers`, content per `serve.trace_content`), or
    NO_TRACING when no endpoint is set."""
    if not settings.otlp_endpoint:
        return NO_TRACING
    return OtlpTracer(settings.otlp_endpoint, settings.otlp_headers, settings.trace_content, engine)


class OtlpTracer(RequestTracer):
    """Spans exported to `endpoint` by a tracer provider of the gateway's own, in a background thread."""

    enabled = True

    def __init__(self, endpoint: str, headers: dict[str, str], content: bool, engine: Engine) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as error:
            raise TuneloopError(
                f"serve.otlp_endpoint is set but the OpenTelemetry exporter is not installed ({error.name})",
                hint="pip install 'tuneloop[serve]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http), "
                "or unset serve.otlp_endpoint",
            ) from None
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context, self.trace, self.kinds = context, trace, SpanKind
        self.propagator = TraceContextTextMapPropagator()
        self.status, self.error = Status, StatusCode.ERROR
        self.content = content
        self.engine = engine
        # shutdown_on_exit=False: the gateway's lifespan shuts it down; an atexit hook would keep every test's
        # provider alive until the interpreter exits.
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME, "service.version": __version__}),
            shutdown_on_exit=False,
        )
        # Headers: serve.otlp_headers over $OTEL_EXPORTER_OTLP_(TRACES_)HEADERS, which the exporter merges itself.
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), headers=headers or None)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tuneloop.gateway", __version__)

    # -- spans ------------------------------------------------------------------------------------------------------
    def route(self, asked: str, served: str, variant: str | None) -> None:
        attributes: dict[str, Any] = {"tuneloop.request.model": asked, "tuneloop.served_model": served}
        if variant is not None:
            attributes["tuneloop.route"] = asked
            attributes["tuneloop.variant"] = variant
        self.tracer.start_span("route", kind=self.kinds.INTERNAL, attributes=attributes).end()

    def generation(self, request: GenerationRequest) -> GenerationTrace:
        return _EngineSpan(self, request)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def failed(self, description: str) -> Any:
        """An error status saying `description`."""
        return self.status(self.error, description)

    def adapter_parent(self, served: str) -> str | None:
        """The base model of `served` when it is an adapter (the engine's model list names it as parent)."""
        return next((model.parent for model in self.engine.models() if model.name == served), None)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat()


def _text_messages(messages: list[dict[str, str]]) -> str:
    """OpenTelemetry GenAI's message format (gen_ai.input.messages / gen_ai.output.messages), as JSON."""
    return json.dumps(
        [
            {
                "role": message["role"],
                "parts": [{"type": "text", "content": message["content"]}],
                **({"finish_reason": message["finish_reason"]} if "finish_reason" in message else {}),
            }
            for message in messages
        ]
    )


class _EngineSpan(GenerationTrace):
    """`chat {model}` / `text_completion {model}`: one engine call, named and attributed after the OpenTelemetry
    GenAI semantic conventions (which Langfuse maps to a generation: model, parameters, usage, input, output)."""

    def __init__(self, owner: OtlpTracer, request: GenerationRequest) -> None:
        self.owner = owner
        self.content = owner.content
        operation = "chat" if request.messages is not None else "text_completion"
        engine = owner.engine.name
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": engine,
            "gen_ai.system": engine,  # the older name of the provider attribute, still read by some backends
            "gen_ai.request.model": request.model,
            "gen_ai.request.max_tokens": request.max_tokens,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p,
            "tuneloop.stream": not request.buffered,
        }
        if request.seed is not None:
            attributes["gen_ai.request.seed"] = request.seed
        parent = owner.adapter_parent(request.model)
        if parent is not None:
            attributes["tuneloop.adapter"] = request.model
            attributes["tuneloop.base_model"] = parent
        if self.content:
            messages = request.messages or [{"role": "user", "content": request.prompt or ""}]
            attributes["gen_ai.input.messages"] = _text_messages(messages)
        self.span = owner.tracer.start_span(
            f"{operation} {request.model}", kind=owner.kinds.CLIENT, attributes=attributes
        )
        self.response_model = request.model
        self.started = time.perf_counter()
        self.first: float | None = None
        self.finished = self.failed = False
        self.answer: list[str] = []

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.span.set_attribute("tuneloop.ttft_s", round(self.first - self.started, 6))
            # Langfuse shows time to first token from this (an ISO timestamp); other backends keep it as an attribute.
            self.span.set_attribute("langfuse.observation.completion_start_time", _iso(time.time_ns()))

    def add_text(self, text: str) -> None:
        if self.content:
            self.answer.append(text)

    def read_events(self, events: bytes) -> None:
        if not self.content:
            return
        for event in events.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            for choice in json.loads(event[6:]).get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    self.answer.append(text)

    def finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None = None) -> None:
        self.finished = True
        span = self.span
        span.set_attribute("gen_ai.response.model", self.response_model)
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        if finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if self.content:
            message = {"role": "assistant", "content": "".join(self.answer)}
            if finish_reason:
                message["finish_reason"] = finish_reason
            span.set_attribute("gen_ai.output.messages", _text_messages([message]))

    def fail(self, error: BaseException) -> None:
        self.failed = True
        self.span.record_exception(error)
        self.span.set_attribute("error.type", type(error).__qualname__)
        self.span.set_status(self.owner.failed(f"{type(error).__name__}: {error}"))

    def end(self) -> None:
        if not (self.finished or self.failed):  # the client went away (or an n>1 sibling failed): not an error
            self.span.set_attribute("tuneloop.cancelled", True)
        self.span.end()


class ServerSpanMiddleware:
    """The server span of each /v1/ request, as plain ASGI (no per-chunk task hop), made the current span so the
    route and engine spans started while the request runs are its children. Added outermost, it sees the guard's
    401/413/429 too."""

    def __init__(self, app: Any, tracer: OtlpTracer) -> None:
        self.app = app
        self.owner = tracer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        owner = self.owner
        method, path = scope["method"], scope["path"]
        # A client's W3C traceparent makes this request a part of its trace.
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in (b"traceparent", b"tracestate")
        }
        parent = owner.propagator.extract(carrier) if carrier else None
        span = owner.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=owner.kinds.SERVER,
            attributes={"http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http")},
        )
        token = owner.context.attach(owner.trace.set_span_in_context(span, parent))
        status = 0
        failure: str | None = None

        async def traced_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        except Exception as error:
            span.record_exception(error)
            failure = type(error).__qualname__
            status = status or 500
            raise
        finally:
            template = getattr(scope.get("route"), "path", None)  # /v1/batches/{batch_id}, set by the router
            if template:
                span.set_attribute("http.route", template)
                span.update_name(f"{method} {template}")
            if status >= 500:  # a server span's 4xx is the client's error, not the server's (semantic conventions)
                span.set_attribute("error.type", failure or str(status))
                span.set_status(owner.failed(f"HTTP {status}"))
            span.end()
            owner.context.detach(token)
