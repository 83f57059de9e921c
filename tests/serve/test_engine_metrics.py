"""The engine's own Prometheus metrics through the gateway, for real: `tuneloop serve` over llama.cpp's llama-server
(SmolLM2-135M as GGUF) on 127.0.0.1. With serve.engine_metrics (default) llama-server runs with --metrics and the
gateway's /metrics carries its `llamacpp:*` series and the KV-cache gauges derived from /slots; a real Prometheus
scraping the gateway gets them and every llama.cpp panel of the Grafana dashboard has data; a stalled engine is
left out of a scrape and counted. With engine_metrics false, none of it. No NVIDIA GPU here: no GPU series."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.monitor.prometheus import dashboard_panels, panel_expression, query, running_prometheus, wait_for_series
from tests.serve.servers import start_serve, wait_ready
from tuneloop.monitor.gpu import gpu_collector
from tuneloop.serve.engines.remote import RemoteEngine
from tuneloop.serve.gateway.engine_metrics import merge_exposition, with_labels

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = REPO / ".llamacpp" / "bin" / "llama-server"
SLOTS = 2


def sample_values(text: str, name: str) -> list[float]:
    """Values of the samples named exactly `name` (any labels) in a Prometheus exposition."""
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] == name
    ]


def metric_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def chat(url: str, content: str) -> None:
    """One chat completion from whatever model the gateway serves."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8},
        timeout=120,
    )
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def gguf_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace for both gateways: SmolLM2 is converted to GGUF once."""
    return tmp_path_factory.mktemp("engine-metrics") / "ws"


@contextmanager
def llamacpp_gateway(
    smollm2_folder: Path, folder: Path, workspace: Path, engine_metrics: bool
) -> Iterator[tuple[str, psutil.Process]]:
    """The gateway's URL and its llama-server child."""
    if not LLAMA_SERVER.exists():
        pytest.skip("llama-server is missing: run `make llamacpp`")
    config = folder / "serve.yaml"
    config.write_text(
        f"model: {{base: {smollm2_folder}}}\n"
        f"serve: {{engine: llamacpp, llamacpp_server: {LLAMA_SERVER}, llamacpp_quant: f16, "
        f"llamacpp_parallel: {SLOTS}, engine_metrics: {str(engine_metrics).lower()}}}\n"
    )
    process, url = start_serve(config, workspace)
    try:
        wait_ready(url, process, seconds=300, log=workspace / "serve" / "llamacpp.log")
        (engine,) = [
            child for child in psutil.Process(process.pid).children() if child.name().startswith("llama-server")
        ]
        yield url, engine
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0


@pytest.mark.slow
def test_gateway_reexports_llamacpp_metrics(smollm2_folder: Path, gguf_workspace: Path, tmp_path: Path) -> None:
    with llamacpp_gateway(smollm2_folder, tmp_path, gguf_workspace, engine_metrics=True) as (url, engine):
        assert "--metrics" in engine.cmdline()
        for question in ("What is 2+2?", "Name a colour.", "Say hello."):
            chat(url, question)
        text = httpx.get(f"{url}/metrics", timeout=30).text
        list(text_string_to_metric_families(text))  # one valid exposition (raises otherwise)
        type_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        assert len(type_lines) == len(set(type_lines)), "a metric family twice"
        assert sample_values(text, "llamacpp:prompt_tokens_total")[0] > 0
        assert sample_values(text, "llamacpp:tokens_predicted_total")[0] >= 3
        assert sample_values(text, "llamacpp:requests_processing") == [0.0]
        assert sample_values(text, "tuneloop:llamacpp_slots") == [SLOTS]
        assert sample_values(text, "tuneloop:llamacpp_kv_cache_tokens")[0] > 0
        assert 0 < sample_values(text, "tuneloop:llamacpp_kv_cache_usage_ratio")[0] <= 1
        assert sample_values(text, "tuneloop:requests_total") == [3.0]  # the gateway's own, still there
        assert not sample_values(text, "tuneloop:engine_metrics_scrape_failures_total")
        if gpu_collector() is None:  # this machine: no NVIDIA GPU, so no GPU series (and no error)
            assert not [name for name in metric_names(text) if name.startswith("tuneloop:gpu_")]

        with running_prometheus(url, tmp_path) as prometheus:
            found = wait_for_series(prometheus, 'llamacpp:prompt_tokens_total{job="tuneloop-gateway"}')
            assert found and float(found[0]["value"][1]) > 0
            chat(url, "One more, for the rates.")
            time.sleep(4)  # a few scrapes after it, for rate()
            for panel in dashboard_panels():
                for target in panel["targets"]:
                    result = query(prometheus, panel_expression(target["expr"]))["result"]
                    if "llamacpp" in target["expr"]:  # a llama.cpp engine is behind this gateway: data
                        assert result, (panel["title"], target["expr"])

        # A stalled engine: the scrape waits ENGINE_METRICS_TIMEOUT_S, leaves it out and counts the failure.
        engine.suspend()
        try:
            response = httpx.get(f"{url}/metrics", timeout=30)
        finally:
            engine.resume()
        assert response.status_code == 200
        assert sample_values(response.text, "tuneloop:requests_total") == [4.0]
        assert not [name for name in metric_names(response.text) if "llamacpp" in name]
        assert sample_values(response.text, "tuneloop:engine_metrics_scrape_failures_total") == [1.0]
        assert sample_values(httpx.get(f"{url}/metrics", timeout=30).text, "llamacpp:prompt_tokens_total")


@pytest.mark.slow
def test_engine_metrics_off(smollm2_folder: Path, gguf_workspace: Path, tmp_path: Path) -> None:
    with llamacpp_gateway(smollm2_folder, tmp_path, gguf_workspace, engine_metrics=False) as (url, engine):
        command = engine.cmdline()
        assert "--metrics" not in command
        chat(url, "Say hello.")
        text = httpx.get(f"{url}/metrics", timeout=30).text
        assert sample_values(text, "tuneloop:requests_total") == [1.0]
        assert not [name for name in metric_names(text) if "llamacpp" in name]
        port = command[command.index("--port") + 1]
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code != 200  # not even enabled


def test_merged_exposition_groups_families_and_labels_replicas() -> None:
    """Two replicas' texts: each family's HELP/TYPE once with both replicas' samples under it, non-engine families
    dropped, names kept exactly (a counter without `_total` keeps its name), labels added first."""
    text = (
        "# HELP vllm:num_requests_running Requests running.\n# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        "# HELP llamacpp:n_tokens_max Largest.\n# TYPE llamacpp:n_tokens_max counter\nllamacpp:n_tokens_max 38\n"
        "# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 1.5\n"
    )
    merged = merge_exposition(
        [(text, {"replica": "http://a:8001"}), (text, {"replica": "http://b:8001"})],
        lambda name: name.startswith(("vllm:", "llamacpp:")),
    )
    assert merged.splitlines() == [
        "# HELP vllm:num_requests_running Requests running.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{replica="http://a:8001",engine="0",model_name="m"} 2.0',
        'vllm:num_requests_running{replica="http://b:8001",engine="0",model_name="m"} 2.0',
        "# HELP llamacpp:n_tokens_max Largest.",
        "# TYPE llamacpp:n_tokens_max counter",
        'llamacpp:n_tokens_max{replica="http://a:8001"} 38',
        'llamacpp:n_tokens_max{replica="http://b:8001"} 38',
    ]
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert [sample.labels["replica"] for sample in families["vllm:num_requests_running"].samples] == [
        "http://a:8001",
        "http://b:8001",
    ]
    assert with_labels('x{a="}"} 1 1700000000', {"r": 'q"'}) == 'x{r="q\\"",a="}"} 1 1700000000'


def test_remote_engine_labels_each_replica() -> None:
    sources = RemoteEngine(["http://10.0.0.5:8001/v1", "http://10.0.0.6:8001/"]).metrics_sources()
    assert [(source.url, source.labels) for source in sources] == [
        ("http://10.0.0.5:8001/metrics", {"replica": "http://10.0.0.5:8001"}),
        ("http://10.0.0.6:8001/metrics", {"replica": "http://10.0.0.6:8001"}),
    ]
