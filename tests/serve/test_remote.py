"""The remote engine balancing two real replicas on 127.0.0.1; one is killed during a load run and nothing is lost."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve.servers import start_serve, wait_ready


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[dict]:
    replica_config = tmp_path / "replica.yaml"
    replica_config.write_text(f"model: {{base: {tiny_model_dir}}}\nserve: {{engine: transformers, precision: fp32}}\n")
    started = [start_serve(replica_config, tmp_path / "ws") for _ in range(2)]
    replicas = [process for process, _ in started]
    urls = [url for _, url in started]
    for url, process in zip(urls, replicas, strict=True):
        wait_ready(url, process)
    front_config = tmp_path / "front.yaml"
    front_config.write_text(
        f"model: {{base: {tiny_model_dir}}}\nserve: {{engine: remote, remote_urls: [{urls[0]}/v1, {urls[1]}/v1]}}\n"
    )
    front, front_url = start_serve(front_config, tmp_path / "ws")
    wait_ready(front_url, front)
    yield {"front": front_url, "replicas": replicas, "urls": urls, "model": str(tiny_model_dir)}
    for process in [front, *replicas]:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def test_replica_killed_during_load_loses_no_request(cluster: dict) -> None:
    body = {
        "model": cluster["model"],
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16,
        "temperature": 0,
    }

    def ask(_: int) -> int:
        return httpx.post(f"{cluster['front']}/v1/chat/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(6) as pool:
        first = list(pool.map(ask, range(12)))  # both replicas serve
        stats = httpx.get(f"{cluster['front']}/health", timeout=10).json()["replicas"]
        assert all(replica["served"] > 0 for replica in stats)  # least-outstanding spread the load
        futures = [pool.submit(ask, index) for index in range(48)]
        time.sleep(0.3)
        cluster["replicas"][0].kill()  # hard crash mid-run
        rest = [future.result() for future in futures]
    assert first.count(200) == 12
    assert rest.count(200) == 48  # retried on the other replica: none lost
    stats = httpx.get(f"{cluster['front']}/health", timeout=10).json()["replicas"]
    assert stats[0]["failures"] >= 1 and stats[1]["served"] > stats[0]["served"]
    # with every replica gone the gateway answers 503 in OpenAI's error format, not a hang or a 500
    cluster["replicas"][1].kill()
    response = httpx.post(f"{cluster['front']}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
