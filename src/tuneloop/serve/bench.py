"""`tuneloop bench serve`: a load generator for any OpenAI-compatible endpoint (the gateway, vLLM, llama.cpp).

Streaming mode (the default): N simulated users each send streamed chat requests back to back until the request
count or the duration is reached (both bound the run), once per users value. Reports time to first token,
inter-token latency and end-to-end latency percentiles, output tokens/s, requests/s and errors. A shared system prompt
(`system_prompt_tokens`) in front of every request is the workload where prefix caching should win.

Batch mode: requests/s of the gateway's synchronous `/v1/batch` (K requests per call, N calls in flight) and of the
OpenAI Files + Batches API (upload a JSONL file, create a batch, poll until it completes, download its output;
requests/s = completed requests / wall time from create to completed).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

# Batches API: how often the job is polled; the measured wall time is late by at most this much.
POLL_SECONDS = 0.1
FINISHED_BATCH = ("completed", "failed", "cancelled", "expired")


@dataclass
class Sample:
    ttft: float | None = None
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def api_url(url: str) -> str:
    """The base URL with `/v1`, as OpenAI clients take it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def messages_for(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    user = {"role": "user", "content": prompt}
    return [{"role": "system", "content": system_prompt}, user] if system_prompt else [user]


def shared_system_prompt(tokens: int) -> str:
    """A system prompt of about `tokens` tokens (English words of a BPE vocabulary: ~1.3 tokens each), the same for
    every request: a prefix the engine can cache. The served token count is reported from the usage (prompt tokens)."""
    sentences = [
        "You are the order desk assistant of a small furniture and outdoor goods shop.",
        "Read each customer message carefully and extract the order it contains.",
        "Customers write in many styles: short notes, long emails, lists and forwarded chats.",
        "Names can appear before or after the product, and cities may be in brackets.",
        "Quantities can be digits or words; always answer with the number itself.",
        "Dates come in many formats; always answer with the year, month and day.",
        "Never invent a value that the message does not contain; leave it empty instead.",
        "Answer with one line of JSON and nothing else, so that a program can read it.",
    ]
    words: list[str] = []
    while len(words) < tokens / 1.3:
        words += " ".join(sentences).split()
    return " ".join(words[: max(int(tokens / 1.3), 1)])


async def _one(
    client: Any,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    headers: dict[str, str],
    extra_body: dict[str, Any],
) -> Sample:
    sample = Sample()
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra_body,
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
                    sample.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
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


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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
    system_prompt: str | None,
    extra_body: dict[str, Any],
) -> tuple[list[Sample], float]:
    import httpx

    headers = _headers(api_key)
    samples: list[Sample] = []
    counter = {"next": 0}
    deadline = time.perf_counter() + duration if duration else None

    async def user(client: Any) -> None:
        while counter["next"] < requests and (deadline is None or time.perf_counter() < deadline):
            index = counter["next"]
            counter["next"] += 1
            messages = messages_for(prompts[index % len(prompts)], system_prompt)
            samples.append(await _one(client, url, model, messages, max_tokens, headers, extra_body))

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
    system_prompt: str | None = None,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streaming run: `users` concurrent users, `requests` in all (or until `duration` seconds). `extra_body`:
    fields merged into every request (e.g. llama-server's `lora` when a server is asked directly, not through the
    gateway)."""
    url = api_url(url)
    samples, wall = asyncio.run(
        _run(
            url,
            model,
            prompts,
            users,
            requests,
            duration,
            max_tokens,
            api_key,
            timeout,
            system_prompt,
            extra_body or {},
        )
    )
    good = [sample for sample in samples if sample.error is None]
    ttft = [sample.ttft for sample in good if sample.ttft is not None]
    e2e = [sample.e2e for sample in good]
    gaps = [gap for sample in good for gap in sample.gaps]
    tokens = sum(sample.output_tokens for sample in good)
    result: dict[str, Any] = {
        "mode": "stream",
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
    result["mean_prompt_tokens"] = statistics.fmean([s.prompt_tokens for s in good]) if good else 0.0
    result["error_samples"] = sorted({sample.error for sample in samples if sample.error})[:5]
    return result


def default_request_count(users: int) -> int:
    """Requests per streaming run when none is given: 64, and at least two per user."""
    return max(64, 2 * users)


def bench_serve_users(
    url: str,
    model: str,
    prompts: list[str],
    users: list[int],
    requests: int | None = None,
    duration: float | None = None,
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 300,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """One streaming run per users value, in the order given (`requests` None: default_request_count)."""
    return [
        bench_serve(
            url,
            model,
            prompts,
            count,
            requests or default_request_count(count),
            duration,
            max_tokens,
            api_key,
            timeout,
            system_prompt,
        )
        for count in users
    ]


def _chat_body(model: str, prompt: str, max_tokens: int, system_prompt: str | None) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages_for(prompt, system_prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def _sync_batches(
    url: str,
    bodies: list[dict[str, Any]],
    batch_size: int,
    calls_in_flight: int,
    api_key: str | None,
    timeout: float,
) -> tuple[list[tuple[int, dict[str, Any]]], list[float], list[str], float]:
    """POST /v1/batch with `batch_size` requests per call, `calls_in_flight` calls at once: each item's status and
    body, each call's latency, the calls that failed as a whole, and the wall time."""
    import httpx

    chunks = [bodies[start : start + batch_size] for start in range(0, len(bodies), batch_size)]
    items: list[tuple[int, dict[str, Any]]] = []
    latencies: list[float] = []
    call_errors: list[str] = []
    queue = list(reversed(chunks))

    async def caller(client: Any) -> None:
        while queue:
            chunk = queue.pop()
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/batch", json={"requests": chunk}, headers=_headers(api_key))
            except httpx.HTTPError as error:
                call_errors.append(f"{type(error).__name__}: {error}")
                items.extend((0, {}) for _ in chunk)
                continue
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                call_errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                items.extend((response.status_code, {}) for _ in chunk)
                continue
            items.extend((int(item["status"]), item.get("body") or {}) for item in response.json()["data"])

    limits = httpx.Limits(max_connections=calls_in_flight, max_keepalive_connections=calls_in_flight)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(caller(client) for _ in range(min(calls_in_flight, len(chunks)))))
    return items, latencies, call_errors, time.perf_counter() - started


def bench_sync_batch(
    url: str,
    model: str,
    prompts: list[str],
    requests: int,
    batch_size: int = 16,
    calls_in_flight: int = 1,
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 600,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Requests/s of the synchronous `/v1/batch` endpoint: `requests` chat requests, `batch_size` per call."""
    url = api_url(url)
    bodies = [_chat_body(model, prompts[index % len(prompts)], max_tokens, system_prompt) for index in range(requests)]
    items, latencies, call_errors, wall = asyncio.run(
        _sync_batches(url, bodies, batch_size, calls_in_flight, api_key, timeout)
    )
    completed = [body for status, body in items if status == 200]
    tokens = sum((body.get("usage") or {}).get("completion_tokens", 0) for body in completed)
    return {
        "mode": "batch",
        "url": url,
        "model": model,
        "users": calls_in_flight,
        "batch_size": batch_size,
        "calls": math.ceil(requests / batch_size),
        "requests": requests,
        "completed": len(completed),
        "failed": requests - len(completed),
        "errors": requests - len(completed),
        "wall_seconds": wall,
        "requests_per_second": len(completed) / wall if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_second": tokens / wall if wall else 0.0,
        "call_p50_s": percentile(latencies, 50),
        "call_p95_s": percentile(latencies, 95),
        "error_samples": sorted(set(call_errors))[:5],
    }


def bench_batches_api(
    url: str,
    model: str,
    prompts: list[str],
    requests: int,
    max_tokens: int = 64,
    api_key: str | None = None,
    timeout: float = 1800,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Requests/s of the OpenAI Files + Batches API: upload `requests` lines, create the batch, poll until it is
    finished, download the output; wall time from create to finished (upload and download are not counted)."""
    import httpx

    url = api_url(url)
    lines = [
        {
            "custom_id": f"bench-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _chat_body(model, prompts[index % len(prompts)], max_tokens, system_prompt),
        }
        for index in range(requests)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    row: dict[str, Any] = {"mode": "batches-api", "url": url, "model": model, "users": None, "requests": requests}
    with httpx.Client(base_url=url, headers=_headers(api_key), timeout=60) as client:
        upload = client.post("/files", files={"file": ("bench.jsonl", content)}, data={"purpose": "batch"})
        if upload.status_code != 200:
            return _refused(row, "upload", upload)
        started = time.perf_counter()
        created = client.post(
            "/batches",
            json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        if created.status_code != 200:
            return _refused(row, "create", created)
        job = created.json()
        while job["status"] not in FINISHED_BATCH and time.perf_counter() - started < timeout:
            time.sleep(POLL_SECONDS)
            job = client.get(f"/batches/{job['id']}").json()
        wall = time.perf_counter() - started
        outputs: list[dict[str, Any]] = []
        if job.get("output_file_id"):
            text = client.get(f"/files/{job['output_file_id']}/content").text
            outputs = [json.loads(line) for line in text.splitlines() if line.strip()]
    completed = [line for line in outputs if line["response"]["status_code"] == 200]
    tokens = sum((line["response"]["body"].get("usage") or {}).get("completion_tokens", 0) for line in completed)
    failed = requests - len(completed)  # failed lines, and lines never processed (a job that failed or timed out)
    return {
        **row,
        "batch_id": job["id"],
        "status": job["status"],
        "completed": len(completed),
        "failed": failed,
        "request_counts": job.get("request_counts"),
        "errors": failed,
        "wall_seconds": wall,
        "requests_per_second": len(completed) / wall if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_second": tokens / wall if wall else 0.0,
    }


def _refused(row: dict[str, Any], step: str, response: Any) -> dict[str, Any]:
    """A Batches API row for a job that never ran: every request failed, with the server's answer."""
    error = f"{step}: HTTP {response.status_code}: {response.text[:200]}"
    return {
        **row,
        "status": f"{step} refused",
        "completed": 0,
        "failed": row["requests"],
        "errors": row["requests"],
        "wall_seconds": 0.0,
        "requests_per_second": 0.0,
        "output_tokens": 0,
        "output_tokens_per_second": 0.0,
        "error_samples": [error],
    }


def bench_batch_modes(
    url: str,
    model: str,
    prompts: list[str],
    users: list[int],
    requests: int,
    batch_size: int = 16,
    max_tokens: int = 64,
    api_key: str | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Batch mode: a `/v1/batch` row per users value (calls in flight), then one Batches API row."""
    rows = [
        bench_sync_batch(
            url, model, prompts, requests, batch_size, count, max_tokens, api_key, system_prompt=system_prompt
        )
        for count in users
    ]
    rows.append(bench_batches_api(url, model, prompts, requests, max_tokens, api_key, system_prompt=system_prompt))
    return rows


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of `tuneloop bench serve`: the CPU it ran on, every run, and with a single run its fields at the top
    level too (what `tuneloop cost --bench` and earlier scripts read)."""
    from tuneloop.device import cpu_description

    single = runs[0] if len(runs) == 1 else {}
    return {**single, "cpu": cpu_description(), "runs": runs}


def default_prompts(count: int = 64) -> list[str]:
    """Prompts from tuneloop's built-in demo task (no data files needed)."""
    from tuneloop.data.demo import generate_rows

    return [f"{row['instruction']}\n\n{row['input']}" for row in generate_rows(count, seed=99)]
