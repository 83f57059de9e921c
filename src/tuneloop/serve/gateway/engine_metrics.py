"""The engines' own Prometheus metrics, re-exported on the gateway's /metrics: vLLM's `vllm:*` and llama-server's
`llamacpp:*` series, fetched from each engine server when the gateway is scraped (the servers listen on private
127.0.0.1 ports that Prometheus cannot reach).

The text is relabelled, not re-rendered: parsing and re-rendering with prometheus_client renames some series (a
counter without `_total`, like `llamacpp:n_tokens_max`, would gain one), and the names must stay the engine's own.
Only engine families are kept (`process_*` and `python_*` of vLLM's process would read as the gateway's).

llama-server no longer exports its KV-cache use, so for a llama-server the gateway also reads `/slots` and derives
`tuneloop:llamacpp_kv_cache_tokens` (tokens held in the slots' KV cells, prompts kept for reuse included),
`tuneloop:llamacpp_kv_cache_usage_ratio` (those over the context of all slots) and `tuneloop:llamacpp_slots`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneloop.serve.engines.base import MetricsSource

#: engine metric prefixes kept (vLLM, llama-server, SGLang, TGI behind a remote engine)
ENGINE_PREFIXES = ("vllm:", "llamacpp:", "sglang:", "tgi_")
#: a scrape waits this long for an engine: an engine busy decoding must not stall the gateway's own metrics
ENGINE_METRICS_TIMEOUT_S = 2.0


@dataclass
class Family:
    """One metric family's exposition lines: HELP/TYPE once, then the samples of every source."""

    header: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def with_labels(sample: str, labels: dict[str, str]) -> str:
    """`name{a="b"} 1` -> `name{replica="...",a="b"} 1`: the labels go first, so label values holding braces or
    spaces are never parsed."""
    if not labels:
        return sample
    added = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    if sample[end : end + 1] == "{":
        inside = sample[end + 1 :]
        return f"{sample[: end + 1]}{added}{'' if inside.startswith('}') else ','}{inside}"
    return f"{sample[:end]}{{{added}}}{sample[end:]}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def merge_exposition(texts: list[tuple[str, dict[str, str]]], keep: Callable[[str], bool]) -> str:
    """Prometheus text from several sources as one exposition: each family's HELP/TYPE once, its samples (from
    every source, with that source's labels) together, families whose name `keep` rejects left out."""
    families: dict[str, Family] = {}
    for text, labels in texts:
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    family = families.setdefault(current, Family())
                    if not any(existing.split(maxsplit=2)[1] == parts[1] for existing in family.header):
                        family.header.append(line)
                continue  # other comments (OpenMetrics' `# EOF`) end nothing and say nothing
            name = line.split("{", 1)[0].split(" ", 1)[0]
            # A sample belongs to the family its TYPE line opened (histogram `_bucket`s, counter `_total`s).
            owner = current if current is not None and name.startswith(current) else name
            families.setdefault(owner, Family()).samples.append(with_labels(line, labels))
    return "".join(
        "\n".join([*family.header, *family.samples]) + "\n"
        for name, family in families.items()
        if keep(name) and family.samples
    )


#: the gauges slot_gauges derives (kept in the merged exposition next to the engines' own families)
SLOT_GAUGES = ("tuneloop:llamacpp_kv_cache_tokens", "tuneloop:llamacpp_kv_cache_usage_ratio", "tuneloop:llamacpp_slots")


def slot_gauges(slots: list[dict[str, Any]]) -> str:
    """The KV-cache gauges llama-server's /metrics lacks, from its /slots answer."""
    held = sum(int(slot.get("n_prompt_tokens", 0)) for slot in slots)
    capacity = sum(int(slot.get("n_ctx", 0)) for slot in slots)
    gauges = [
        ("tuneloop:llamacpp_kv_cache_tokens", "Tokens held in llama-server's slots (KV cells, prompts kept for "
         "reuse included), from /slots.", held),
        ("tuneloop:llamacpp_kv_cache_usage_ratio", "KV-cache use of llama-server: tokens held over the context of "
         "all slots, from /slots.", held / capacity if capacity else 0.0),
        ("tuneloop:llamacpp_slots", "llama-server's slots (--parallel), from /slots.", len(slots)),
    ]  # fmt: skip
    return "".join(
        f"# HELP {name} {text}\n# TYPE {name} gauge\n{name} {float(value)}\n" for name, text, value in gauges
    )


async def scrape_engines(sources: list[MetricsSource], on_failure: Callable[[str], None]) -> str:
    """Every source's engine series as one exposition; a source that fails (refused, timed out, not 200, a /slots
    answer that is not a list) is left out of this scrape and reported to `on_failure` with its URL."""
    if not sources:
        return ""
    import httpx

    async with httpx.AsyncClient(timeout=ENGINE_METRICS_TIMEOUT_S) as client:

        async def fetch(url: str) -> str | None:
            try:
                response = await client.get(url)
                response.raise_for_status()
                return response.text
            except httpx.HTTPError:
                on_failure(url)
                return None

        texts = await asyncio.gather(*(fetch(source.url) for source in sources))
        answered = [(text, source.labels) for text, source in zip(texts, sources, strict=True) if text is not None]
        llama_servers = [
            (source.url.removesuffix("/metrics") + "/slots", source.labels)
            for text, source in zip(texts, sources, strict=True)
            if text is not None and "\nllamacpp:" in f"\n{text}"
        ]
        slot_answers = await asyncio.gather(*(fetch(url) for url, _ in llama_servers))
    for (url, labels), answer in zip(llama_servers, slot_answers, strict=True):
        slots = _json_list(answer) if answer is not None else None
        if slots is not None:
            answered.append((slot_gauges(slots), labels))
        elif answer is not None:
            on_failure(url)
    return merge_exposition(answered, lambda name: name.startswith(ENGINE_PREFIXES) or name in SLOT_GAUGES)


def _json_list(text: str) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None
