"""OpenTelemetry traces of the gateway: the real SDK and OTLP/HTTP exporter send to a receiver on 127.0.0.1 that
decodes the protobuf export (tests/serve/otlp_receiver.py). The gateways are real (the in-process engine on the tiny
model with a LoRA adapter behind an A/B route; a remote engine over a second gateway for the pass-through stream);
spans are flushed by the gateway's own shutdown, not waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serve.failing_engine import FailsOnRequest
from tests.serve.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.tiny_model import save_random_lora
from tuneloop.config import RouteConfig, ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.transformers_engine import TransformersEngine
from tuneloop.serve.gateway.app import create_app
from tuneloop.serve.gateway.routing import Router
from tuneloop.serve.gateway.tracing import traces_url

SECRET = "zebra-quartz-7781"  # in every prompt: must reach no span unless serve.trace_content
SERVER, CLIENT, INTERNAL = 2, 3, 1  # span kinds in OTLP
ERROR = 2  # status code in OTLP
LANGFUSE_AUTH = "Basic cGstbGYtdGVzdDpzay1sZi10ZXN0"  # base64("pk-lf-test:sk-lf-test")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_lora(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "tiny-lora")


def traced_app(receiver: OtlpReceiver, base: Path, adapter: Path, **settings: Any) -> Any:
    config = ServeConfig(otlp_endpoint=receiver.url, otlp_headers={"Authorization": LANGFUSE_AUTH}, **settings)
    engine = FailsOnRequest(config, str(base), base, {"tiny-lora": adapter}, None)
    return create_app(engine, config, router=Router({"ab": RouteConfig(variants={"tiny-lora": 1})}))


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def streamed(response: Any) -> tuple[str, dict[str, int]]:
    """The text and the usage of a streamed chat completion."""
    text, usage = "", {}
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
    return text, usage


def tree(spans: list[ReceivedSpan], status_code: int) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The server span whose response had `status_code`, and its children."""
    (server,) = [
        span for span in spans if span.kind == SERVER and span.attributes["http.response.status_code"] == status_code
    ]
    return server, [span for span in spans if span.parent_id == server.span_id]


def by_name(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    (span,) = [span for span in spans if span.name == name]
    return span


@pytest.mark.slow
def test_request_span_tree_with_genai_attributes(tiny_model_dir: Path, adapter: Path) -> None:
    base = str(tiny_model_dir)
    with OtlpReceiver() as receiver, TestClient(traced_app(receiver, tiny_model_dir, adapter)) as client:
        plain = client.post("/v1/chat/completions", json=chat(base, f"hello {SECRET}", max_tokens=4))
        stream = client.post(
            "/v1/chat/completions",
            json=chat("ab", f"again {SECRET}", max_tokens=5, stream=True, stream_options={"include_usage": True}),
        )
        missing = client.post("/v1/chat/completions", json=chat("no-such-model", SECRET))
        failed = client.post("/v1/chat/completions", json=chat(base, f"please fail {SECRET}", max_tokens=3))
        # the gateway's shutdown flushed its spans: no waiting
    assert [plain.status_code, stream.status_code, missing.status_code, failed.status_code] == [200, 200, 404, 503]
    spans = receiver.spans
    assert spans and all(span.resource["service.name"] == "tuneloop-gateway" for span in spans)
    assert all(headers["authorization"] == LANGFUSE_AUTH for headers in receiver.headers)  # serve.otlp_headers
    assert not any(SECRET.encode() in body for body in receiver.bodies)  # no prompt without trace_content

    # Non-streamed, base model: server span → route + engine span, one trace.
    engine = next(s for s in spans if s.attributes.get("tuneloop.stream") is False and s.status_code != ERROR)
    server = next(span for span in spans if span.span_id == engine.parent_id)
    children = [span for span in spans if span.parent_id == server.span_id]
    assert server.name == "POST /v1/chat/completions" and server.parent_id == ""
    assert (
        server.attributes["http.request.method"] == "POST" and server.attributes["url.path"] == "/v1/chat/completions"
    )
    assert server.attributes["http.route"] == "/v1/chat/completions" and server.status_code != ERROR
    route = by_name(children, "route")
    assert route.kind == INTERNAL and route.attributes["tuneloop.request.model"] == base
    assert "tuneloop.variant" not in route.attributes
    assert by_name(children, f"chat {base}") is engine
    assert engine.kind == CLIENT and engine.trace_id == route.trace_id == server.trace_id
    attributes = engine.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "transformers"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == base
    assert attributes["gen_ai.request.max_tokens"] == 4 and attributes["tuneloop.stream"] is False
    usage = plain.json()["usage"]
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == [plain.json()["choices"][0]["finish_reason"]]
    assert 0 < attributes["tuneloop.ttft_s"] < 60 and "langfuse.observation.completion_start_time" in attributes
    assert "tuneloop.adapter" not in attributes and engine.status_code != ERROR
    assert "gen_ai.input.messages" not in attributes and "gen_ai.output.messages" not in attributes

    # Streamed through the A/B route: the variant on the route span, the adapter on the engine span.
    engine = next(span for span in spans if span.attributes.get("tuneloop.stream") is True)
    server = next(span for span in spans if span.span_id == engine.parent_id)
    assert server.kind == SERVER and server.attributes["http.response.status_code"] == 200
    route = next(span for span in spans if span.parent_id == server.span_id and span.name == "route")
    assert route.attributes["tuneloop.request.model"] == "ab" and route.attributes["tuneloop.variant"] == "tiny-lora"
    assert engine.name == "chat tiny-lora" and engine.attributes["tuneloop.adapter"] == "tiny-lora"
    assert engine.attributes["tuneloop.base_model"] == base
    _, usage = streamed(stream)
    assert engine.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert engine.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert engine.attributes["tuneloop.ttft_s"] > 0

    # Unknown model: a 404 is the client's error (not a failed span) and never reached routing or the engine.
    server, children = tree(spans, 404)
    assert server.status_code != ERROR and children == []

    # Engine failure: 503, the server span and the engine span failed, the exception recorded.
    server, children = tree(spans, 503)
    assert server.status_code == ERROR
    engine = by_name(children, f"chat {base}")
    assert engine.status_code == ERROR and "lost its device" in engine.status_message
    assert engine.attributes["error.type"] == "TuneloopError" and "exception" in engine.events
    assert "gen_ai.usage.output_tokens" not in engine.attributes


@pytest.mark.slow
def test_trace_content_puts_prompt_and_answer_on_the_engine_span(tiny_model_dir: Path, adapter: Path) -> None:
    with OtlpReceiver() as receiver, TestClient(traced_app(receiver, tiny_model_dir, adapter, trace_content=True)) as c:
        answer = c.post("/v1/chat/completions", json=chat(str(tiny_model_dir), SECRET, max_tokens=4)).json()
    engine = next(span for span in receiver.spans if span.kind == CLIENT)
    (question,) = json.loads(engine.attributes["gen_ai.input.messages"])
    assert question == {"role": "user", "parts": [{"type": "text", "content": SECRET}]}
    (reply,) = json.loads(engine.attributes["gen_ai.output.messages"])
    assert reply["role"] == "assistant" and reply["finish_reason"] == answer["choices"][0]["finish_reason"]
    assert reply["parts"] == [{"type": "text", "content": answer["choices"][0]["message"]["content"]}]


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` on a free port of 127.0.0.1 (uvicorn in a thread) until the block ends."""
    import uvicorn

    from tuneloop.net import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the replica did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.mark.slow
def test_pass_through_stream_is_traced_from_the_usage_event(tiny_model_dir: Path) -> None:
    """A remote engine streams its replica's bytes through (no parsing): tokens come from the usage event, the answer
    (with trace_content) from the forwarded events."""
    from tuneloop.serve.engines.remote import RemoteEngine

    replica_settings = ServeConfig()
    replica = create_app(
        TransformersEngine(replica_settings, str(tiny_model_dir), tiny_model_dir, {}, None), replica_settings
    )
    with served(replica) as replica_url, OtlpReceiver() as receiver:
        settings = ServeConfig(otlp_endpoint=f"{receiver.url}/v1/traces", trace_content=True)
        front = create_app(RemoteEngine([f"{replica_url}/v1"]), settings)
        assert front.state.gateway.serving.passthrough
        with TestClient(front) as client:
            body = chat(str(tiny_model_dir), SECRET, max_tokens=6, stream=True, stream_options={"include_usage": True})
            response = client.post("/v1/chat/completions", json=body)
    text, usage = streamed(response)
    engine = next(span for span in receiver.spans if span.kind == CLIENT)
    server = next(span for span in receiver.spans if span.span_id == engine.parent_id)
    assert server.name == "POST /v1/chat/completions" and engine.attributes["gen_ai.provider.name"] == "remote"
    assert engine.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert engine.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] > 0
    assert engine.attributes["tuneloop.ttft_s"] > 0 and engine.status_code != ERROR
    (reply,) = json.loads(engine.attributes["gen_ai.output.messages"])
    assert reply["parts"][0]["content"] == text


def test_traces_url_appends_the_signal_path_once() -> None:
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://cloud.langfuse.com/api/public/otel/") == (
        "https://cloud.langfuse.com/api/public/otel/v1/traces"
    )
    assert traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"


def test_without_an_endpoint_tracing_and_error_reporting_load_nothing() -> None:
    """No serve.otlp_endpoint and no Sentry DSN: neither SDK is imported and the request path gets no-op calls."""
    script = """
import sys
from tuneloop.config import ServeConfig
from tuneloop.serve.engines.remote import RemoteEngine
from tuneloop.serve.gateway.app import create_app
from tuneloop.serve.gateway.tracing import NO_TRACING
app = create_app(RemoteEngine(["http://127.0.0.1:9/v1"]), ServeConfig())
assert app.state.gateway.serving.tracer is NO_TRACING
assert not any(m.cls.__name__ == "ServerSpanMiddleware" for m in app.user_middleware)
loaded = [name for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp", "sentry_sdk") if name in sys.modules]
assert not loaded, loaded
"""
    env = {key: value for key, value in os.environ.items() if key != "SENTRY_DSN"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_endpoint_without_the_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.serve.engines.remote import RemoteEngine
    from tuneloop.serve.gateway.tracing import gateway_tracer

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(TuneloopError, match=r"serve\.otlp_endpoint is set but the OpenTelemetry exporter"):
        gateway_tracer(ServeConfig(otlp_endpoint="http://127.0.0.1:4318"), RemoteEngine(["http://127.0.0.1:9/v1"]))
