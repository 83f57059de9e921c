"""The remote engine: one or more OpenAI-compatible servers (vLLM, llama.cpp's llama-server, SGLang, TGI's OpenAI
front end, another tuneloop) behind the gateway, as replicas of the same models.

Load balancing: least outstanding requests among replicas whose circuit is closed. A replica that fails before the
first byte (connection refused or reset, 5xx) is retried on another replica, so the client sees no error; after the
first byte a failure ends that request. Three consecutive failures open a replica's circuit for `cooldown` seconds;
then one probe request is let through (half-open) and success closes it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tuneloop.errors import TuneloopError
from tuneloop.serve.engines.base import Engine, GenerationChunk, GenerationRequest, MetricsSource, ServedModel

if TYPE_CHECKING:
    import aiohttp

T = TypeVar("T")


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    failures: int = 0
    open_until: float = 0.0
    served: int = 0

    def available(self, now: float) -> bool:
        """Closed circuit; or, once the cooldown has passed (half-open), only while no probe is in flight."""
        return self.open_until == 0.0 or (self.open_until <= now and self.in_flight == 0)


class ReplicaFailed(Exception):
    """A replica failed before sending anything: safe to retry elsewhere."""


class StaleConnection(ReplicaFailed):
    """The replica had closed the pooled keep-alive connection before answering (llama-server closes a connection
    after 100 requests): nothing was processed, so the same replica is asked again on a new connection."""


class RemoteEngine(Engine):
    name = "remote"
    passthrough = True

    def __init__(
        self,
        urls: list[str],
        api_key: str | None = None,
        failure_threshold: int = 3,
        cooldown: float = 10.0,
        timeout: float = 600.0,
        request_overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not urls:
            raise TuneloopError("serve.engine=remote needs serve.remote_urls", hint="e.g. [http://127.0.0.1:8001/v1]")
        self.replicas = [
            Replica(url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1") for url in urls
        ]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.timeout = timeout
        # Per served model name, fields merged into its requests (llama-server selects a LoRA by `lora`, not `model`).
        self.request_overrides = request_overrides or {}
        self._models: list[ServedModel] = []
        self._session: Any = None

    def models(self) -> list[ServedModel]:
        return self._models

    def stats(self) -> dict[str, Any]:
        return {
            "replicas": [
                {
                    "url": r.url,
                    "in_flight": r.in_flight,
                    "served": r.served,
                    "failures": r.failures,
                    "open": r.open_until > time.monotonic(),
                }
                for r in self.replicas
            ]
        }

    async def start(self) -> None:
        import aiohttp

        # aiohttp, not httpx: its C HTTP parser and plain asyncio streams take less than half the CPU per relayed
        # event (measured: 46 vs 102 ms of gateway CPU per 1000 events, 32 users; docs/benchmarks.md), CPU that an
        # engine on the same cores needs. No per-host connection limit: the engine's own batching is the limit.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            read_bufsize=2**20,  # one SSE event (a line) may be long: an echoed prompt, a big tool call
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
        )
        errors = []
        for replica in self.replicas:
            try:
                async with self._session.get(
                    f"{replica.url}/models", timeout=aiohttp.ClientTimeout(total=10)
                ) as answer:
                    answer.raise_for_status()
                    listed_models = (await answer.json(content_type=None))["data"]
                self._models = [
                    ServedModel(item["id"], item.get("parent"), item.get("owned_by", "remote"))
                    for item in listed_models
                ]
                # Names selected by request fields (a llama-server's LoRAs) are adapters of the replica's model.
                listed = {model.name for model in self._models}
                self._models += [
                    ServedModel(name, self._models[0].name if self._models else None, "remote")
                    for name in self.request_overrides
                    if name not in listed
                ]
                return
            except Exception as error:  # try the next replica
                errors.append(f"{replica.url}: {error}")
        raise TuneloopError("no remote replica answered /v1/models: " + "; ".join(errors))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _choose(self, tried: set[int]) -> int | None:
        now = time.monotonic()
        candidates = [i for i, r in enumerate(self.replicas) if i not in tried and r.available(now)]
        if not candidates:
            return None
        return min(candidates, key=lambda i: self.replicas[i].in_flight)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._failover(request, lambda replica: self._stream(replica, request))

    async def _failover(
        self, request: GenerationRequest, attempt: Callable[[Replica], AsyncIterator[T]]
    ) -> AsyncIterator[T]:
        """`attempt`'s items from the least busy replica whose circuit is closed; a replica failing before anything
        reached the client is replaced by another (the same one again when only its pooled connection was stale);
        after that, the request ends with an error. A buffered request holds its items until the attempt completed."""
        tried: set[int] = set()
        stale_retried = False
        while True:
            index = self._choose(tried)
            if index is None:
                raise TuneloopError("every replica failed or is cooling down")
            tried.add(index)
            replica = self.replicas[index]
            replica.in_flight += 1
            delivered = False
            held: list[T] = []
            try:
                async for item in attempt(replica):
                    if request.buffered:
                        held.append(item)  # the client gets nothing until the attempt completed
                    else:
                        delivered = True
                        yield item
                replica.failures = 0
                replica.served += 1
            except ReplicaFailed as failure:
                if isinstance(failure, StaleConnection) and not delivered and not stale_retried:
                    stale_retried = True
                    tried.discard(index)  # only the pooled connection was closed: ask the same replica again
                    continue
                self._failed(replica)
                if delivered:
                    raise TuneloopError(f"replica {replica.url} failed mid-stream") from None
                continue  # nothing reached the client: retry on another replica
            finally:
                replica.in_flight -= 1
            for item in held:
                yield item
            return

    def _failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.failures >= self.failure_threshold or replica.open_until > 0:
            replica.open_until = time.monotonic() + self.cooldown

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The OpenAI request sent to a replica: streamed, with the usage chunk, and the fields that select the
        served model on it (request_overrides)."""
        chat = request.messages is not None
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        body["messages" if chat else "prompt"] = request.messages if chat else request.prompt
        body.update(self.request_overrides.get(request.model, {}))
        return body

    def stream_events(self, request: GenerationRequest) -> AsyncIterator[bytes]:
        """Pass-through streaming: the replica's server-sent events as bytes, each whole (ending in a blank line),
        with the replica's model name replaced by the served one where request_overrides renamed it. Failover as in
        `generate`: a replica failing before its first event is replaced by another; after it, the stream ends with
        an error."""
        body = self.request_body(request)
        upstream = str(body["model"])
        chat = request.messages is not None
        if upstream == request.model:
            return self._failover(request, lambda replica: self._raw_events(replica, chat, body))
        rename = (f'"model":{json.dumps(upstream)}'.encode(), f'"model":{json.dumps(request.model)}'.encode())

        async def renamed(replica: Replica) -> AsyncIterator[bytes]:
            async for events in self._raw_events(replica, chat, body):
                yield events.replace(*rename)

        return self._failover(request, renamed)

    @asynccontextmanager
    async def _post(self, replica: Replica, chat: bool, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """The replica's streamed answer to `body`, its errors sorted into what may be retried: a refused connection,
        a reset or a 5xx becomes ReplicaFailed; a connection the replica closed before answering, StaleConnection;
        a 4xx, a TuneloopError with the replica's words (the request itself is wrong: no other replica would take
        it). Errors while the body is read are the caller's (see `_relayed`)."""
        import aiohttp

        path = "chat/completions" if chat else "completions"
        try:
            async with self._session.post(f"{replica.url}/{path}", json=body) as response:
                if response.status >= 500:
                    raise ReplicaFailed(f"{replica.url} answered {response.status}")
                if response.status != 200:
                    detail = (await response.read()).decode(errors="replace")[:300]
                    raise TuneloopError(f"replica {replica.url} refused the request ({response.status}): {detail}")
                replica.open_until = 0.0
                yield response
        except aiohttp.ServerDisconnectedError as error:
            # Closed cleanly before a response: a pooled keep-alive connection the replica had already closed
            # (llama-server closes one after 100 requests or 5 s idle); mid-body it is ClientPayloadError instead.
            raise StaleConnection(f"{replica.url}: {error}") from error
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ReplicaFailed(f"{replica.url}: {type(error).__name__} {error}") from error

    async def _raw_events(self, replica: Replica, chat: bool, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """The replica's SSE stream cut at event boundaries (a network read may end mid-event)."""
        async with self._post(replica, chat, body) as response:
            pending = b""
            async for data in _relayed(replica, response.content.iter_any()):
                pending += data
                cut = pending.rfind(b"\n\n")
                if cut >= 0:
                    yield pending[: cut + 2]
                    pending = pending[cut + 2 :]
            if pending.strip():
                yield pending + b"\n\n"

    async def _stream(self, replica: Replica, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        chat = request.messages is not None
        finish, usage = None, {"prompt_tokens": 0, "completion_tokens": 0}
        async with self._post(replica, chat, self.request_body(request)) as response:
            async for line in _relayed(replica, response.content):
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        yield GenerationChunk(text)
                    finish = choice.get("finish_reason") or finish
        yield GenerationChunk(
            "",
            finish_reason=finish or "stop",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
        )

    def metrics_sources(self) -> list[MetricsSource]:
        """Every replica's /metrics, its series labelled `replica` with the replica's URL (a scrape shows them all;
        sum or filter by `replica` in queries)."""
        bases = [replica.url.removesuffix("/v1") for replica in self.replicas]
        return [MetricsSource(f"{base}/metrics", {"replica": base}) for base in bases]


async def _relayed(replica: Replica, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`reads` (a response body's chunks or lines), a connection lost while reading becoming ReplicaFailed."""
    import aiohttp

    try:
        async for data in reads:
            yield data
    except (aiohttp.ClientError, TimeoutError) as error:
        raise ReplicaFailed(f"{replica.url}: {type(error).__name__} while reading") from error
