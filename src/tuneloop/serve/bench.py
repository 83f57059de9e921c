"""`tuneloop bench serve`: a load generator for any OpenAI-compatible endpoint (the gateway, vLLM, llama.cpp).

N simulated users each send streamed chat requests back to back until the request count or the duration is reached
(both bound the run). Reports time to first token, inter-token latency and end-to-end latency percentiles, output
tokens/s, requests/s and errors.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    ttft: float | None = None
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _one(client: Any, url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str]) -> Sample:
    sample = Sample()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = last = time.perf_counter()
    try:
        async with _stream_with_reconnect(client, f"{url}/chat/completions", body, headers) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    sample.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    moment = time.perf_counter()
                    if sample.ttft is None:
                        sample.ttft = moment - started
                    else:
                        sample.gaps.append(moment - last)
                    last = moment
    except Exception as error:  # connection refused, reset, timeout: counted, the run goes on
        sample.error = f"{type(error).__name__}: {error}"
    sample.e2e = time.perf_counter() - started
    return sample


@asynccontextmanager
async def _stream_with_reconnect(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """POST and stream; once more on a fresh connection if the server had closed the pooled keep-alive connection
    before answering (llama-server closes a connection after 100 requests): what HTTP clients do for stale sockets."""
    import httpx

    from tuneloop.net import closed_before_response

    for attempt in (1, 2):
        try:
            async with client.stream("POST", url, json=body, headers=headers) as response:
                yield response
                return
        except httpx.RemoteProtocolError as error:
            if attempt == 2 or not closed_before_response(error):
                raise


async def _run(
    url: str,
    model: str,
    prompts: list[str],
    users: int,
    requests: int,
    duration: float | None,
    max_tokens: int,
    api_key: str | None,
    timeout: float,
) -> tuple[list[Sample], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[Sample] = []
    counter = {"next": 0}
    deadline = time.perf_counter() + duration if duration else None

    async def user(client: Any) -> None:
        while counter["next"] < requests and (deadline is None or time.perf_counter() < deadline):
            index = counter["next"]
            counter["next"] += 1
            samples.append(await _one(client, url, model, prompts[index % len(prompts)], max_tokens, headers))

    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(user(client) for _ in range(users)))
    return samples, time.perf_counter() - started


def bench_serve(
    url: str,
    model: str,
    prompts: list[str],
    users: int = 8,
    requests: int = 64,
    duration: float | None = None,
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 300,
) -> dict[str, Any]:
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    samples, wall = asyncio.run(_run(url, model, prompts, users, requests, duration, max_tokens, api_key, timeout))
    good = [sample for sample in samples if sample.error is None]
    ttft = [sample.ttft for sample in good if sample.ttft is not None]
    e2e = [sample.e2e for sample in good]
    gaps = [gap for sample in good for gap in sample.gaps]
    tokens = sum(sample.output_tokens for sample in good)
    result: dict[str, Any] = {
        "url": url,
        "model": model,
        "users": users,
        "requests": len(samples),
        "errors": len(samples) - len(good),
        "wall_seconds": wall,
    }
    for name, values in (("ttft", ttft), ("e2e", e2e), ("itl", gaps)):
        for percent in (50, 95, 99):
            result[f"{name}_p{percent}_s"] = percentile(values, percent)
    result["output_tokens"] = tokens
    result["output_tokens_per_second"] = tokens / wall if wall else 0.0
    result["requests_per_second"] = len(good) / wall if wall else 0.0
    result["mean_output_tokens"] = statistics.fmean([s.output_tokens for s in good]) if good else 0.0
    result["error_samples"] = sorted({sample.error for sample in samples if sample.error})[:5]
    return result


def default_prompts(count: int = 64) -> list[str]:
    """Prompts from tuneloop's built-in demo task (no data files needed)."""
    from tuneloop.data.demo import generate_rows

    return [f"{row['instruction']}\n\n{row['input']}" for row in generate_rows(count, seed=99)]
