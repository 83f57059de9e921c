"""Pass-through streaming: the gateway forwards an HTTP engine's own server-sent events instead of parsing and
re-serialising every chunk, and still counts tokens, measures TTFT, names the served model and lets the response be
rated.

The first test drives RemoteEngine.stream_events against real replica servers on 127.0.0.1 (reads that end
mid-event, a renamed model, a replica failing before its first byte); the last runs the real gateway over a real
llama-server with SmolLM2-135M and a LoRA, with and without `serve.passthrough`.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.serve.servers import start_serve, wait_ready
from tests.tiny_model import save_random_lora
from tuneloop.serve.engines.base import GenerationRequest
from tuneloop.serve.engines.remote import RemoteEngine

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def events(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode() for chunk in chunks)


ANSWER = (
    events(
        {"id": "chatcmpl-up1", "model": "base", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"id": "chatcmpl-up1", "model": "base", "choices": [{"delta": {"content": "Paris"}}]},
        {"id": "chatcmpl-up1", "model": "base", "choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"id": "chatcmpl-up1", "model": "base", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
    )
    + b"data: [DONE]\n\n"
)


@pytest.mark.anyio
async def test_stream_events_are_whole_renamed_and_fail_over() -> None:
    """Two real replica servers on 127.0.0.1: the first answers 503, the second trickles the answer in 5-byte
    writes (events arrive cut anywhere, as TCP may deliver them)."""
    asked: list[str] = []

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "base", "object": "model"}]})

    async def down(_request: web.Request) -> web.Response:
        asked.append("down")
        return web.Response(status=503)

    async def up(request: web.Request) -> web.StreamResponse:
        asked.append("up")
        body = await request.json()
        assert body["model"] == "base" and body["lora"] == [{"id": 0, "scale": 1.0}]
        assert body["stream_options"] == {"include_usage": True}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(ANSWER), 5):
            await response.write(ANSWER[start : start + 5])
            await asyncio.sleep(0)
        return response

    runners, urls = [], []
    for chat in (down, up):
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    engine = RemoteEngine(urls, request_overrides={"adapter": {"model": "base", "lora": [{"id": 0, "scale": 1.0}]}})
    try:
        await engine.start()
        request = GenerationRequest(model="adapter", messages=QUESTION, max_tokens=8)
        received = [block async for block in engine.stream_events(request)]
    finally:
        await engine.stop()
        for runner in runners:
            await runner.cleanup()
    assert asked == ["down", "up"]  # the 503 before the first byte was retried on the other replica
    assert all(block.endswith(b"\n\n") for block in received)  # never half an event
    text = b"".join(received)
    assert text == ANSWER.replace(b'"model":"base"', b'"model":"adapter"')
    assert b'"model":"base"' not in text


@pytest.mark.slow
def test_gateway_passes_llama_server_stream_through(smollm2_folder: Path, tmp_path: Path) -> None:
    if not LLAMA_SERVER.exists():
        pytest.skip("llama-server is missing: run `make llamacpp`")
    adapter = str(save_random_lora(smollm2_folder, tmp_path / "adapter", r=8, alpha=32, seed=0))
    answers: dict[bool, dict[str, str]] = {}
    for passthrough in (True, False):
        config = tmp_path / f"serve-{passthrough}.yaml"
        config.write_text(
            f"model: {{base: {smollm2_folder}}}\n"
            f"serve: {{engine: llamacpp, llamacpp_server: {LLAMA_SERVER}, llamacpp_quant: f16, llamacpp_parallel: 2, "
            f"passthrough: {str(passthrough).lower()}}}\n"
        )
        process, url = start_serve(config, tmp_path / "ws", "--model", adapter)
        try:
            wait_ready(url, process, seconds=300, log=tmp_path / "ws" / "serve" / "llamacpp.log")
            answers[passthrough] = {}
            for model in (str(smollm2_folder), adapter):
                plain = stream(url, model, include_usage=False)
                counted = stream(url, model, include_usage=True)
                # The usage event the gateway asked for on the client's behalf never reaches a client that did not.
                assert all("usage" not in chunk or chunk["usage"] is None for chunk in plain)
                usage = counted[-1]["usage"]
                assert usage["completion_tokens"] > 0 and not counted[-1]["choices"]
                assert {chunk["model"] for chunk in plain + counted} == {model}  # the served name, not the engine's
                assert len({chunk["id"] for chunk in plain}) == 1
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in plain if c["choices"])
                assert text == "".join(c["choices"][0]["delta"].get("content") or "" for c in counted if c["choices"])
                answers[passthrough][model] = text
                rated = httpx.post(f"{url}/v1/feedback", json={"response_id": plain[0]["id"], "rating": "up"})
                assert rated.status_code == 200, rated.text
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            generated = [
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("tuneloop:generation_tokens_total{") and f'model="{adapter}"' in line
            ]
            assert generated and generated[0] > 0  # tokens counted from the engine's usage event
            assert "tuneloop:time_to_first_token_seconds_count" in metrics
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0
    assert answers[True] == answers[False]  # forwarding bytes changes nothing the client reads
    assert answers[True][adapter] != answers[True][str(smollm2_folder)]


def stream(url: str, model: str, include_usage: bool) -> list[dict]:
    body = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks
