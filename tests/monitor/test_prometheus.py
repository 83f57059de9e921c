"""A real Prometheus (Debian's prometheus) scraping a running gateway with deploy/monitoring/prometheus.yml: the
target is up, a serving metric and a training metric come back, and every query of the Grafana dashboard JSON is
valid PromQL that Prometheus evaluates."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.monitor.conftest import ServedLoop, system_tool
from tests.serve.servers import free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "src" / "tuneloop" / "deploy" / "monitoring"


def query(prometheus: str, expression: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert response["status"] == "success", (expression, response)
    return response["data"]


def test_prometheus_scrapes_the_gateway(served_loop: ServedLoop, tmp_path: Path) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [served_loop.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            system_tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prometheus = f"http://127.0.0.1:{port}"
    try:
        deadline, requests = time.time() + 90, []
        while time.time() < deadline:
            try:  # until it is up, Prometheus refuses connections, then answers 503 in plain text
                requests = query(prometheus, 'sum(tuneloop:requests_total{job="tuneloop-gateway"})')["result"]
            except (httpx.HTTPError, ValueError):
                requests = []
            if requests:
                break
            time.sleep(1)
        assert requests and float(requests[0]["value"][1]) == 12
        assert query(prometheus, 'up{job="tuneloop-gateway"}')["result"][0]["value"][1] == "1"
        loss = query(prometheus, "tuneloop:training_loss")["result"]
        assert [series["metric"]["run_id"] for series in loss] == [served_loop.run_id]
        assert query(prometheus, "tuneloop:eval_metric")["result"]

        dashboard = json.loads((MONITORING / "grafana" / "tuneloop-dashboard.json").read_text())
        expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
        assert len(expressions) >= 10
        for expression in expressions:
            query(prometheus, expression.replace("$__rate_interval", "1m"))
    finally:
        process.terminate()
        process.wait(timeout=30)
