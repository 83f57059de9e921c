"""A real Prometheus (Debian's prometheus) scraping a running gateway with deploy/monitoring/prometheus.yml: the
target is up, a serving metric and a training metric come back, and every query of the Grafana dashboard JSON is
valid PromQL that Prometheus evaluates. (tests/serve/test_engine_metrics.py does the same over a llama.cpp engine,
where the engine panels have data.)"""

from __future__ import annotations

from pathlib import Path

from tests.monitor.conftest import ServedLoop
from tests.monitor.prometheus import dashboard_panels, panel_expression, query, running_prometheus, wait_for_series
from tuneloop.monitor.gpu import gpu_collector


def test_prometheus_scrapes_the_gateway(served_loop: ServedLoop, tmp_path: Path) -> None:
    with running_prometheus(served_loop.url, tmp_path) as prometheus:
        requests = wait_for_series(prometheus, 'sum(tuneloop:requests_total{job="tuneloop-gateway"})')
        assert requests and float(requests[0]["value"][1]) == 12
        assert query(prometheus, 'up{job="tuneloop-gateway"}')["result"][0]["value"][1] == "1"
        loss = query(prometheus, "tuneloop:training_loss")["result"]
        assert [series["metric"]["run_id"] for series in loss] == [served_loop.run_id]
        assert query(prometheus, "tuneloop:eval_metric")["result"]

        expressions = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
        assert len(expressions) >= 10
        for expression in expressions:
            query(prometheus, panel_expression(expression))
        # An in-process engine has no engine metrics of its own (and nothing failed to be scraped).
        assert not query(prometheus, '{__name__=~"llamacpp:.+|vllm:.+|tuneloop:engine_metrics_.+"}')["result"]
        gpus = query(prometheus, '{__name__=~"tuneloop:gpu_.+"}')["result"]
        assert bool(gpus) == (gpu_collector() is not None)  # GPU gauges exactly where NVML finds a GPU
