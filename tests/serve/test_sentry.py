"""Gateway errors reach Sentry: the real sentry-sdk sends its envelopes to an ingest endpoint on 127.0.0.1
(tests/sentry_receiver.py); the gateway is real (in-process engine on the tiny model, made to fail on request).
Events carry the exception, the component, the release, the request's URL and method and tags for the model and the
status the client saw; never the API key, cookies or the prompt unless `serve.sentry_send_content`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.sentry_receiver import SentryReceiver, exception_of
from tests.serve.failing_engine import FailsOnRequest
from tuneloop import __version__
from tuneloop.config import ServeConfig
from tuneloop.serve.gateway.app import create_app

API_KEY = "sk-gateway-key-4321"
OTHER_KEY = "x-api-key-value-77"
COOKIE = "session-cookie-value-9"
SECRET = "walrus-nebula-5512"  # in every prompt
HEADERS = {"Authorization": f"Bearer {API_KEY}", "X-Api-Key": OTHER_KEY, "Cookie": f"session={COOKIE}"}


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def gateway(receiver: SentryReceiver, base: Path, **settings: Any) -> TestClient:
    config = ServeConfig(sentry_dsn=receiver.dsn, api_keys=[API_KEY], **settings)
    app = create_app(FailsOnRequest(config, str(base), base, {}, None), config)
    return TestClient(app, raise_server_exceptions=False)  # a crash is a 500 here, as for a real client


def by_status(events: list[dict[str, Any]], status: str) -> dict[str, Any]:
    (event,) = [event for event in events if event.get("tags", {}).get("status") == status]
    return event


@pytest.fixture(autouse=True)
def no_sentry_left_behind() -> Any:
    yield
    import sentry_sdk

    assert not sentry_sdk.get_client().is_active()  # the gateway's stop closed its client


@pytest.mark.slow
def test_gateway_errors_reach_sentry_with_context_and_without_secrets(tiny_model_dir: Path) -> None:
    base = str(tiny_model_dir)
    with SentryReceiver() as receiver, gateway(receiver, tiny_model_dir) as client:
        answered = client.post("/v1/chat/completions", json=chat(base, SECRET), headers=HEADERS)
        unavailable = client.post("/v1/chat/completions", json=chat(base, f"please fail {SECRET}"), headers=HEADERS)
        crashed = client.post("/v1/chat/completions", json=chat(base, f"please crash {SECRET}"), headers=HEADERS)
        stream = client.post(
            "/v1/chat/completions", json=chat(base, f"please fail {SECRET}", stream=True), headers=HEADERS
        )
        # stopping the gateway flushed and closed the Sentry client: the envelopes are in
    assert [answered.status_code, unavailable.status_code, crashed.status_code] == [200, 503, 500]
    assert stream.status_code == 200 and "engine_error" in stream.text  # the failure told inside the stream
    events = receiver.events
    assert len(events) == 3, [exception_of(event)["type"] for event in events]  # one each; the crash not twice

    lost = by_status(events, "503")
    assert exception_of(lost)["type"] == "TuneloopError" and exception_of(lost)["value"] == "the engine lost its device"
    crash = by_status(events, "500")
    assert exception_of(crash)["type"] == "RuntimeError" and exception_of(crash)["value"] == "a bug in the engine"
    streamed = by_status(events, "stream_error")
    assert exception_of(streamed)["type"] == "TuneloopError"
    for event in events:
        assert event["release"] == f"tuneloop@{__version__}"
        tags = event["tags"]
        assert tags["component"] == "gateway" and tags["model"] == base and tags["engine"] == "transformers"
        request = event["request"]
        assert request["method"] == "POST" and request["url"].endswith("/v1/chat/completions")
        names = {name.lower() for name in request.get("headers", {})}
        assert names and not names & {"authorization", "x-api-key", "cookie"}
        assert "data" not in request and "cookies" not in request
    sent = b"".join(receiver.bodies)
    for secret in (SECRET, API_KEY, OTHER_KEY, COOKIE):
        assert secret.encode() not in sent, secret
    # Local variables (which hold the prompt) are not sent either.
    frames = [frame for event in events for frame in exception_of(event)["stacktrace"]["frames"]]
    assert frames and not any("vars" in frame for frame in frames)


@pytest.mark.slow
def test_sentry_send_content_attaches_the_request_body(tiny_model_dir: Path) -> None:
    base = str(tiny_model_dir)
    with SentryReceiver() as receiver, gateway(receiver, tiny_model_dir, sentry_send_content=True) as client:
        failed = client.post("/v1/chat/completions", json=chat(base, f"please fail {SECRET}"), headers=HEADERS)
    assert failed.status_code == 503
    (event,) = receiver.events
    assert SECRET in json.dumps(event["request"]["data"])  # asked for: the prompt is there
    sent = b"".join(receiver.bodies)
    assert API_KEY.encode() not in sent and COOKIE.encode() not in sent  # credentials never


def test_a_dsn_without_sentry_sdk_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.error_reporting import init_error_reporting
    from tuneloop.errors import TuneloopError

    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # as if not installed
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    with pytest.raises(TuneloopError, match=r"train\.sentry_dsn is set but sentry-sdk is not installed"):
        init_error_reporting("http://key@127.0.0.1:9/1", "train")
    monkeypatch.setenv("SENTRY_DSN", "http://key@127.0.0.1:9/1")  # maybe meant for another program: a warning
    assert init_error_reporting(None, "gateway") is False
