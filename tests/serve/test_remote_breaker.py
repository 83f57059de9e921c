"""RemoteEngine's circuit breaker and retries, replica by replica.

Each replica is a real aiohttp server on 127.0.0.1 whose next answers a test scripts (a 500, a connection reset
before or after the first event, a keep-alive connection closed before answering), so the breaker's state machine
(closed, open, half-open) is driven deterministically over real sockets; tests/serve/test_remote.py covers the same
engine against real model servers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import GenerationChunk, GenerationRequest
from tuneloop.serve.engines.remote import RemoteEngine

MODEL = "tiny"
COOLDOWN = 0.2
REPLICAS = ("replica-a", "replica-b")

pytestmark = pytest.mark.anyio

URL_NAMES: dict[str, str] = {}  # a replica server's /v1 URL -> its name in REPLICAS

Handler = Callable[[str, web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(event)}\n\n".encode() for event in events) + b"data: [DONE]\n\n"


def answer_from(replica: str) -> bytes:
    return sse(
        {"choices": [{"delta": {"content": f"hello from {replica}"}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    )


def reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed or refusing replica does."""
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


def gone() -> web.Response:
    """What a handler returns once its connection is closed: aiohttp has nowhere to write it."""
    return web.Response(status=599)


def ok(replica: str) -> web.Response:
    return web.Response(body=answer_from(replica), content_type="text/event-stream")


@dataclass
class Replicas:
    """What each replica does with its next chat requests (`ok` once the script is used up), and whom was asked."""

    scripts: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in REPLICAS})
    asked: list[str] = field(default_factory=list)

    async def handle(self, replica: str, request: web.Request) -> web.StreamResponse:
        self.asked.append(replica)
        behaviour = self.scripts[replica].pop(0) if self.scripts[replica] else "ok"
        if behaviour == "refuse":  # reset before any answer: the replica failed
            reset(request)
            return gone()
        if behaviour == "stale":  # closed cleanly before answering: what a pooled keep-alive connection looks like
            request.transport.close()
            return gone()
        if behaviour == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if behaviour == "break":  # the first event, then the connection drops
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(answer_from(replica).split(b"\n\n")[0] + b"\n\n")
            await asyncio.sleep(0.05)
            reset(request)
            return gone()
        return ok(replica)


@asynccontextmanager
async def replica_servers(handle: Handler) -> AsyncIterator[list[str]]:
    """One real HTTP server per name in REPLICAS on 127.0.0.1, each answering /v1/models itself and passing chat
    requests to `handle(name, request)`; yields their /v1 URLs in REPLICAS order."""
    runners, urls = [], []
    for name in REPLICAS:

        async def chat(request: web.Request, name: str = name) -> web.StreamResponse:
            return await handle(name, request)

        async def models(_request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
        URL_NAMES[urls[-1]] = name
    try:
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
def replicas() -> Replicas:
    return Replicas()


@pytest.fixture
async def engine(replicas: Replicas) -> AsyncIterator[RemoteEngine]:
    async with replica_servers(replicas.handle) as urls:
        remote = RemoteEngine(urls, cooldown=COOLDOWN)
        await remote.start()
        yield remote
        await remote.stop()


def request(streamed: bool = False) -> GenerationRequest:
    return GenerationRequest(MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, buffered=not streamed)


async def ask(engine: RemoteEngine, streamed: bool = False) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request(streamed))]


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def replica_state(engine: RemoteEngine, name: str) -> dict:
    return next(row for row in engine.stats()["replicas"] if URL_NAMES[row["url"]] == name)


async def test_three_failures_open_the_circuit_and_traffic_moves(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["500"] * 3
    for _ in range(3):  # the least-outstanding tie goes to replica-a first; each 500 is retried on replica-b
        assert text(await ask(engine)) == "hello from replica-b"
    assert replicas.asked == ["replica-a", "replica-b"] * 3
    assert replica_state(engine, "replica-a")["open"] and replica_state(engine, "replica-a")["failures"] == 3
    replicas.asked.clear()
    for _ in range(4):
        assert text(await ask(engine)) == "hello from replica-b"
    assert replicas.asked == ["replica-b"] * 4  # an open circuit gets no traffic


async def test_two_failures_leave_the_circuit_closed(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["500", "500"]
    for _ in range(2):
        await ask(engine)
    assert not replica_state(engine, "replica-a")["open"]
    replicas.asked.clear()
    assert text(await ask(engine)) == "hello from replica-a"  # still in rotation; its success resets the count
    assert replica_state(engine, "replica-a")["failures"] == 0


async def test_after_the_cooldown_a_successful_probe_closes_the_circuit(
    engine: RemoteEngine, replicas: Replicas
) -> None:
    replicas.scripts["replica-a"] = ["500"] * 3
    for _ in range(3):
        await ask(engine)
    assert replica_state(engine, "replica-a")["open"]
    await asyncio.sleep(COOLDOWN * 1.5)
    replicas.asked.clear()
    assert text(await ask(engine)) == "hello from replica-a"  # half-open: the probe goes to replica-a and succeeds
    state = replica_state(engine, "replica-a")
    assert not state["open"] and state["failures"] == 0
    assert text(await ask(engine)) == "hello from replica-a"  # closed again: back in normal rotation
    assert replicas.asked == ["replica-a", "replica-a"]


async def test_a_failed_probe_reopens_the_circuit_at_once(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["500"] * 4
    for _ in range(3):
        await ask(engine)
    await asyncio.sleep(COOLDOWN * 1.5)
    replicas.asked.clear()
    assert text(await ask(engine)) == "hello from replica-b"  # the probe failed; the caller still got an answer
    assert replicas.asked == ["replica-a", "replica-b"]
    assert replica_state(engine, "replica-a")["open"]  # one failure while half-open is enough, not three
    replicas.asked.clear()
    await ask(engine)
    assert replicas.asked == ["replica-b"]


@pytest.mark.parametrize("failure", ["refuse", "500"])
@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_failure_before_the_first_byte_is_retried_elsewhere(
    engine: RemoteEngine, replicas: Replicas, failure: str, streamed: bool
) -> None:
    replicas.scripts["replica-a"] = [failure]
    chunks = await ask(engine, streamed)
    assert text(chunks) == "hello from replica-b"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 4
    assert replicas.asked == ["replica-a", "replica-b"]
    assert replica_state(engine, "replica-a")["failures"] == 1


async def test_failure_mid_stream_is_an_error(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["break"]
    received: list[str] = []
    with pytest.raises(TuneloopError, match="mid-stream"):
        async for chunk in engine.generate(request(streamed=True)):
            received.append(chunk.text)
    assert received == ["hello from replica-a"]  # the client had this token: a retry would repeat or contradict it
    assert replicas.asked == ["replica-a"]
    assert replica_state(engine, "replica-a")["failures"] == 1


async def test_failure_mid_answer_of_a_buffered_request_is_retried(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["break"]
    assert text(await ask(engine)) == "hello from replica-b"  # nothing had reached the client yet
    assert replicas.asked == ["replica-a", "replica-b"]


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
async def test_stale_keep_alive_is_retried_once_on_the_same_replica(
    engine: RemoteEngine, replicas: Replicas, streamed: bool
) -> None:
    replicas.scripts["replica-a"] = ["stale"]
    assert text(await ask(engine, streamed)) == "hello from replica-a"
    assert replicas.asked == ["replica-a", "replica-a"]
    assert replica_state(engine, "replica-a")["failures"] == 0  # not the replica's fault


async def test_second_stale_connection_counts_as_a_failure(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts["replica-a"] = ["stale", "stale"]
    assert text(await ask(engine)) == "hello from replica-b"
    assert replicas.asked == ["replica-a", "replica-a", "replica-b"]
    assert replica_state(engine, "replica-a")["failures"] == 1


async def test_every_replica_failing_is_an_error(engine: RemoteEngine, replicas: Replicas) -> None:
    replicas.scripts = {name: ["refuse"] for name in REPLICAS}
    with pytest.raises(TuneloopError, match="every replica failed"):
        await ask(engine)


def test_half_open_lets_one_probe_through_at_a_time() -> None:
    """After the cooldown a replica takes a single probe; more traffic waits until the probe closed the circuit."""
    from tuneloop.serve.engines.remote import Replica

    replica = Replica("http://r/v1", open_until=1.0)
    assert not replica.available(now=0.5)  # open
    assert replica.available(now=2.0)  # half-open, no probe yet
    replica.in_flight = 1
    assert not replica.available(now=2.0)  # the probe is in flight: nobody else
    replica.open_until = 0.0
    assert replica.available(now=2.0)  # closed: any number in flight


async def test_half_open_engine_sends_one_probe_while_others_go_elsewhere() -> None:
    """Through the engine: after the cooldown, while the probe to the recovering replica is in flight, concurrent
    requests go to the healthy replica; the probe's success closes the circuit."""
    asked: list[str] = []
    failing = {"replica-a": 3}

    async def handle(replica: str, _request: web.Request) -> web.Response:
        asked.append(replica)
        if failing.get(replica, 0) > 0:
            failing[replica] -= 1
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if replica == "replica-a":
            await asyncio.sleep(0.3)  # a slow probe: the others arrive while it is in flight
        return ok(replica)

    async with replica_servers(handle) as urls:
        engine = RemoteEngine(urls, cooldown=COOLDOWN)
        await engine.start()
        try:
            for _ in range(3):  # three 500s open replica-a's circuit (each retried on replica-b)
                await ask(engine)
            await asyncio.sleep(COOLDOWN + 0.05)
            asked.clear()
            answers = await asyncio.gather(*(ask(engine) for _ in range(4)))
            assert asked.count("replica-a") == 1 and asked.count("replica-b") == 3
            assert sorted(text(chunks) for chunks in answers).count("hello from replica-a") == 1
            assert not replica_state(engine, "replica-a")["open"]  # the probe succeeded: closed again
        finally:
            await engine.stop()
