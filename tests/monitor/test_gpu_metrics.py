"""GPU gauges through NVML (`nvidia-ml-py`) for real. On a machine without an NVIDIA GPU, NVML does not initialise:
the collector is None and the gateway's GPU registry exports nothing. Where NVML initialises, the gauges read every
GPU with plausible values, and memory a CUDA tensor takes shows up in them (run this file on a GPU machine:
`pytest tests/monitor/test_gpu_metrics.py`)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.monitor.gpu import gpu_collector
from tuneloop.serve.gateway.metrics import GatewayMetrics


def nvml_gpu_count() -> int:
    """GPUs NVML sees, asked of NVML itself (0 where it does not initialise)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        return 0


def gauges(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Family name -> {gpu index: value}."""
    return {
        family.name: {sample.labels["gpu"]: sample.value for sample in family.samples}
        for family in text_string_to_metric_families(generate_latest(registry).decode())
    }


def test_without_a_gpu_nothing_is_exported() -> None:
    if nvml_gpu_count():
        pytest.skip("NVML sees an NVIDIA GPU here")
    assert gpu_collector() is None
    assert generate_latest(GatewayMetrics().system) == b""


def test_gpu_gauges_read_every_gpu() -> None:
    count = nvml_gpu_count()
    if not count:
        pytest.skip("no NVIDIA GPU")
    collector = gpu_collector()
    assert collector is not None and len(collector.gpus) == count
    assert all(name for _, name, _ in collector.gpus)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    before = gauges(registry)
    indices = {str(index) for index in range(count)}
    for name in (
        "tuneloop:gpu_utilization_percent",
        "tuneloop:gpu_memory_used_bytes",
        "tuneloop:gpu_memory_total_bytes",
    ):
        assert set(before[name]) == indices, name
    for index in indices:
        assert 0 <= before["tuneloop:gpu_utilization_percent"][index] <= 100
        assert 0 < before["tuneloop:gpu_memory_used_bytes"][index] <= before["tuneloop:gpu_memory_total_bytes"][index]
        assert before["tuneloop:gpu_memory_total_bytes"][index] > 1e9
        if index in before.get("tuneloop:gpu_power_watts", {}):
            assert 0 < before["tuneloop:gpu_power_watts"][index] <= before["tuneloop:gpu_power_limit_watts"][index]
        if index in before.get("tuneloop:gpu_temperature_celsius", {}):
            assert 0 < before["tuneloop:gpu_temperature_celsius"][index] < 120
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        return
    held = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda:0")  # 2 GiB on GPU 0
    torch.cuda.synchronize()
    time.sleep(0.5)
    after = gauges(registry)
    grown = after["tuneloop:gpu_memory_used_bytes"]["0"] - before["tuneloop:gpu_memory_used_bytes"]["0"]
    del held
    assert grown >= 1.9 * 1024**3, grown
