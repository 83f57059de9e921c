"""Prometheus metrics of the gateway, named after vLLM's (`vllm:` -> `tuneloop:`) so dashboards carry over, plus
the GPU gauges (tuneloop.monitor.gpu, where NVML finds a GPU) and the switch for re-exporting the engine's own
metrics (engine_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tuneloop.monitor.gpu import gpu_collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class GatewayMetrics:
    def __init__(self, engine_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.engine_metrics = engine_metrics  # serve.engine_metrics: /metrics appends the engine's own series
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
        self.engine_metrics_failures = Counter(
            "tuneloop:engine_metrics_scrape_failures",
            "Scrapes of the engine's own /metrics (or llama-server's /slots) that failed; left out of that scrape.",
            ["url"],
            registry=self.registry,
        )
        # A registry of its own, like the training gauges: the dashboard's serving statistics read self.registry.
        self.system = CollectorRegistry(auto_describe=False)
        if (gpus := gpu_collector()) is not None:  # no NVIDIA GPU (or no nvidia-ml-py): no GPU series at all
            self.system.register(gpus)
