"""RemoteEngine's circuit breaker and retries, replica by replica.

httpx.MockTransport stands in for the network only, so that each replica fails exactly when a test says and the
breaker's state machine (closed, open, half-open) is driven deterministically; everything above the transport is the
real engine. tests/serve/test_remote.py covers the same engine against real replica processes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import GenerationChunk, GenerationRequest
from tuneloop.serve.engines.remote import RemoteEngine

MODEL = "tiny"
COOLDOWN = 0.2
REPLICAS = ("replica-a", "replica-b")

pytestmark = pytest.mark.anyio


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


class BreaksAfterFirstEvent(httpx.AsyncByteStream):
    """A 200 whose connection drops after the first token has been sent."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield answer_from(self.replica).split(b"\n\n")[0] + b"\n\n"
        raise httpx.ReadError("connection reset by peer")


@dataclass
class Replicas:
    """What each replica does with its next chat requests (`ok` once the script is used up), and whom was asked."""

    scripts: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in REPLICAS})
    asked: list[str] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        replica = request.url.host
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        self.asked.append(replica)
        behaviour = self.scripts[replica].pop(0) if self.scripts[replica] else "ok"
        if behaviour == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if behaviour == "stale":  # httpx's words for a pooled keep-alive connection the server had closed
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if behaviour == "500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if behaviour == "break":
            return httpx.Response(200, stream=BreaksAfterFirstEvent(replica))
        return httpx.Response(200, content=answer_from(replica), headers={"content-type": "text/event-stream"})


@pytest.fixture
def replicas() -> Replicas:
    return Replicas()


@pytest.fixture
async def engine(replicas: Replicas) -> AsyncIterator[RemoteEngine]:
    remote = RemoteEngine(
        [f"http://{name}/v1" for name in REPLICAS], cooldown=COOLDOWN, transport=httpx.MockTransport(replicas.handle)
    )
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
    return next(row for row in engine.stats()["replicas"] if row["url"] == f"http://{name}/v1")


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

    async def handle(request: httpx.Request) -> httpx.Response:
        replica = request.url.host
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        asked.append(replica)
        if failing.get(replica, 0) > 0:
            failing[replica] -= 1
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if replica == "replica-a":
            await asyncio.sleep(0.3)  # a slow probe: the others arrive while it is in flight
        return httpx.Response(200, content=answer_from(replica), headers={"content-type": "text/event-stream"})

    engine = RemoteEngine(
        [f"http://{name}/v1" for name in REPLICAS], cooldown=COOLDOWN, transport=httpx.MockTransport(handle)
    )
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
