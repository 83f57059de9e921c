"""A real Prometheus (Debian's `prometheus`) for tests: started with deploy/monitoring/prometheus.yml pointed at the
test's gateways, scraping every second, queried over its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.monitor.conftest import system_tool
from tests.serve.servers import free_port

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "src" / "tuneloop" / "deploy" / "monitoring"


def query(prometheus: str, expression: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert response["status"] == "success", (expression, response)
    return response["data"]


def wait_for_series(prometheus: str, expression: str, seconds: float = 90) -> list[dict]:
    """The result of `expression` once it has one (Prometheus refuses connections, then answers 503, while it
    starts; the first scrape comes a second later); [] after `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            result = query(prometheus, expression)["result"]
        except (httpx.HTTPError, ValueError):
            result = []
        if result:
            return result
        time.sleep(1)
    return []


def dashboard_panels() -> list[dict]:
    return json.loads((MONITORING / "grafana" / "tuneloop-dashboard.json").read_text())["panels"]


def panel_expression(expression: str) -> str:
    """A Grafana query as Prometheus evaluates it (Grafana's $__rate_interval filled in)."""
    return expression.replace("$__rate_interval", "1m")


@contextmanager
def running_prometheus(gateway: str, folder: Path) -> Iterator[str]:
    """Prometheus with the shipped config, its gateway job aimed at `gateway` (http://HOST:PORT); yields its URL."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [gateway.removeprefix("http://")]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            system_tool("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
