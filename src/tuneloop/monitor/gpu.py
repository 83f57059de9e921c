"""NVIDIA GPU gauges for Prometheus, read through NVML (`nvidia-ml-py`, imported as `pynvml`) at scrape time:
utilisation, memory used/total, power and temperature per GPU, labelled by index and product name.

`gpu_collector()` is None where there is nothing to read (the package is missing or `nvmlInit` fails: no NVIDIA
driver, no GPU), so callers register it only when it exists and a CPU machine exports no GPU series at all.
Device-wide readings: they include the memory and power of every process on the GPU (the vLLM child too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class GpuCollector(Collector):
    """One gauge family per reading; a reading the GPU does not support (power on some boards) is left out."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.gpus = [
            (str(index), nvml.nvmlDeviceGetName(handle), handle)
            for index in range(nvml.nvmlDeviceGetCount())
            for handle in [nvml.nvmlDeviceGetHandleByIndex(index)]
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        families = {
            "utilization": GaugeMetricFamily(
                "tuneloop:gpu_utilization_percent",
                "Percent of the last sample period in which a kernel ran on the GPU (NVML).",
                labels=labels,
            ),
            "memory_used": GaugeMetricFamily(
                "tuneloop:gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).", labels=labels
            ),
            "memory_total": GaugeMetricFamily(
                "tuneloop:gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
            ),
            "power": GaugeMetricFamily("tuneloop:gpu_power_watts", "GPU power draw (NVML).", labels=labels),
            "power_limit": GaugeMetricFamily(
                "tuneloop:gpu_power_limit_watts", "Enforced GPU power limit (NVML).", labels=labels
            ),
            "temperature": GaugeMetricFamily(
                "tuneloop:gpu_temperature_celsius", "GPU core temperature (NVML).", labels=labels
            ),
        }
        for index, name, handle in self.gpus:
            for key, value in self._readings(handle).items():
                if value is not None:
                    families[key].add_metric([index, name], float(value))
        yield from families.values()

    def _readings(self, handle: Any) -> dict[str, float | None]:
        nvml = self.nvml
        memory = self._read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        return {
            "utilization": self._read(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "memory_used": None if memory is None else memory.used,
            "memory_total": None if memory is None else memory.total,
            "power": self._read(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),  # milliwatts
            "power_limit": self._read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000),
            "temperature": self._read(lambda: self._temperature(handle)),
        }

    def _read(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except self.nvml.NVMLError:  # not supported on this board, or the GPU fell off the bus: skip the sample
            return None

    def _temperature(self, handle: Any) -> float:
        sensor = self.nvml.NVML_TEMPERATURE_GPU
        try:
            return self.nvml.nvmlDeviceGetTemperatureV(handle, sensor)
        except self.nvml.NVMLError:  # drivers older than the V call
            return self.nvml.nvmlDeviceGetTemperature(handle, sensor)


def gpu_collector() -> GpuCollector | None:
    """The collector over every NVIDIA GPU NVML sees, or None without `nvidia-ml-py`, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()  # reference-counted by NVML; left initialised for the life of the process
        collector = GpuCollector(pynvml)
    except pynvml.NVMLError:
        return None
    return collector if collector.gpus else None
