"""Reading a live gateway's Prometheus /metrics."""

from __future__ import annotations

import time

from tuneloop.errors import TuneloopError


def generation_tokens_total(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    except httpx.HTTPError as error:
        raise TuneloopError(f"cannot read {url}/metrics: {error}") from None
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tuneloop:generation_tokens_total":
                total += sample.value
    return total


def generation_rate(url: str, window: float) -> float:
    """Generated tokens per second over `window` seconds (send load meanwhile, e.g. `tuneloop bench serve`)."""
    first = generation_tokens_total(url)
    time.sleep(window)
    return (generation_tokens_total(url) - first) / window
