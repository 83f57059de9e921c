"""Prometheus metrics of the gateway, named after vLLM's (`vllm:` -> `tuneloop:`) so dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "variant"]
        self.time_to_first_token = Histogram(
            "tuneloop:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "tuneloop:inter_token_latency_seconds",
            "Time between streamed tokens.",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "tuneloop:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tuneloop:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "tuneloop:generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.requests = Counter(
            "tuneloop:requests", "Requests by outcome.", ["model", "variant", "status"], registry=self.registry
        )
        self.running = Gauge("tuneloop:num_requests_running", "Requests in flight.", registry=self.registry)
