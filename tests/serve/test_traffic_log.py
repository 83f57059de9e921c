"""The traffic log (`serve.log_traffic`) through real gateways on 127.0.0.1: a replica on the tiny model (in-process
engine: every stream parsed) and a front gateway whose remote engine is that replica (an HTTP engine: streams pass
through as the replica's bytes). Every answer a client receives — chat and completions, streamed or not, several
choices, batch items — is in the log under the id the client got, with the prompt, the same text, finish reason and
tokens; the id is the one /v1/feedback rates. Without the setting nothing is written."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.serve.servers import start_serve, wait_ready
from tuneloop.artifacts.traffic import TrafficRecord, read_jsonl
from tuneloop.config_file import load_config
from tuneloop.serve.gateway.traffic import PassthroughCapture
from tuneloop.workspace import ServePaths, Workspace

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]


@dataclass
class Gateway:
    url: str
    model: str
    log: Path

    def records(self) -> dict[str, TrafficRecord]:
        read = read_jsonl(self.log, TrafficRecord)
        assert not read.malformed
        return {record.response_id: record for record in read.records}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Gateway, Gateway]]:
    root = tmp_path_factory.mktemp("traffic")
    model = str(tiny_model_dir)
    replica_config = root / "replica.yaml"
    serve = {"engine": "transformers", "precision": "fp32", "log_traffic": True}
    replica_config.write_text(yaml.safe_dump({"model": {"base": model}, "serve": serve}))
    replica, replica_url = start_serve(replica_config, root / "replica")
    front = None
    try:
        wait_ready(replica_url, replica)  # the front asks its replica for /v1/models when it starts
        front_config = root / "front.yaml"
        serve = {"engine": "remote", "remote_urls": [f"{replica_url}/v1"], "log_traffic": True}
        front_config.write_text(yaml.safe_dump({"model": {"base": model}, "serve": serve}))
        front, front_url = start_serve(front_config, root / "front")
        wait_ready(front_url, front)
        yield (
            Gateway(replica_url, model, ServePaths(root / "replica" / "serve").traffic),
            Gateway(front_url, model, ServePaths(root / "front" / "serve").traffic),
        )
    finally:
        for process in (front, replica):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url: str, path: str, body: dict[str, Any]) -> tuple[str, dict[int, str], list[dict[str, Any]]]:
    """(response id, text per choice, every event) of a streamed answer, as a client reads it."""
    events = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    texts: dict[int, str] = {}
    for event in events:
        for choice in event.get("choices") or []:
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return events[0]["id"], texts, events


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **extra}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["parsed", "passthrough"])
def test_every_answer_a_client_receives_is_logged_with_its_prompt(
    gateways: tuple[Gateway, Gateway], which: str
) -> None:
    gateway = gateways[0] if which == "parsed" else gateways[1]
    url, model = gateway.url, gateway.model
    expected: dict[str, dict[str, Any]] = {}  # response id -> what the log must say

    answer = post(url, "/v1/chat/completions", chat_body(model))
    expected[answer["id"]] = {
        "endpoint": "chat.completions",
        "stream": False,
        "answer": answer["choices"][0]["message"]["content"],
        "finish_reason": answer["choices"][0]["finish_reason"],
        "tokens": (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]),
    }

    identifier, texts, events = stream(
        url, "/v1/chat/completions", chat_body(model, stream_options={"include_usage": True})
    )
    usage = events[-1]["usage"]
    finish = next(c["finish_reason"] for e in events for c in e.get("choices") or [] if c.get("finish_reason"))
    expected[identifier] = {
        "endpoint": "chat.completions",
        "stream": True,
        "passthrough": which == "passthrough",
        "answer": texts[0],
        "finish_reason": finish,
        "tokens": (usage["prompt_tokens"], usage["completion_tokens"]),
    }

    completion = {"model": model, "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
    answer = post(url, "/v1/completions", completion)
    expected[answer["id"]] = {"endpoint": "completions", "answer": answer["choices"][0]["text"], "prompt": "The sky is"}
    identifier, texts, _ = stream(url, "/v1/completions", completion)
    expected[identifier] = {
        "endpoint": "completions",
        "stream": True,
        "passthrough": which == "passthrough",
        "answer": texts[0],
        "prompt": "The sky is",
    }

    # Several choices: parsed on every engine (a pass-through stream carries one choice).
    identifier, texts, _ = stream(url, "/v1/chat/completions", chat_body(model, n=2, temperature=1.0, seed=3))
    expected[identifier] = {"stream": True, "passthrough": False, "answer": texts[0], "other_choices": [texts[1]]}

    batch = post(url, "/v1/batch", {"requests": [chat_body(model, max_tokens=4)]})
    item = batch["data"][0]["body"]
    expected[item["id"]] = {"stream": False, "answer": item["choices"][0]["message"]["content"]}

    logged = gateway.records()
    for response_id, wanted in expected.items():
        assert response_id in logged, (wanted, sorted(logged))
        record = logged[response_id]
        assert record.model == record.served == model and record.variant is None
        if wanted.get("endpoint", "chat.completions") == "chat.completions":
            assert record.endpoint == "chat.completions" and record.messages == MESSAGES and record.prompt is None
        else:
            assert record.endpoint == "completions" and record.prompt == wanted["prompt"] and record.messages is None
        assert record.answer == wanted["answer"], response_id  # exactly what the client received
        assert record.answer  # the tiny model says something in 4+ tokens
        assert record.other_choices == wanted.get("other_choices", [])
        assert record.stream == wanted.get("stream", False)
        assert record.passthrough == wanted.get("passthrough", False)
        if "finish_reason" in wanted:
            assert record.finish_reason == wanted["finish_reason"]
        if "tokens" in wanted:
            assert (record.prompt_tokens, record.completion_tokens) == wanted["tokens"]
        assert record.completion_tokens > 0 or not record.passthrough
    # The logged id is the one feedback rates: ratings can be joined to the logged prompt and answer.
    for response_id in expected:
        rated = httpx.post(f"{url}/v1/feedback", json={"response_id": response_id, "rating": "up"}, timeout=30)
        assert rated.status_code == 200, rated.text


def test_the_log_is_off_unless_asked_for(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.serve.launch import build_gateway

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": {"base": str(tiny_model_dir)}, "serve": {"engine": "transformers"}}))
    workspace = Workspace(tmp_path / "ws")
    assert build_gateway(load_config(config), workspace).app.state.gateway.serving.traffic is None
    logged = build_gateway(load_config(config, ["serve.log_traffic=true"]), workspace).app.state.gateway.serving
    assert logged.traffic is not None and logged.traffic.path == workspace.serve.traffic


def test_passthrough_capture_reads_events_cut_anywhere() -> None:
    events = (
        b"".join(
            f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
            for chunk in (
                {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                {"id": "x", "choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]},
                {"id": "x", "choices": [{"index": 0, "delta": {"content": "is \u00e9"}, "finish_reason": None}]},
                {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}},
            )
        )
        + b"data: [DONE]\n\n"
    )
    for size in (1, 5, 17, len(events)):
        capture = PassthroughCapture()
        for start in range(0, len(events), size):
            capture.read(events[start : start + size])
        assert capture.answer == "Paris \u00e9"
        assert (capture.finish_reason, capture.prompt_tokens, capture.completion_tokens) == ("stop", 7, 3)
