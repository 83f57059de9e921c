"""What the machine can do: GPU or not, precision, memory. Chosen at run time; importing needs no GPU library.

A shared service: training, evaluation and serving all ask here, so `auto` means the same thing in every stage."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    reason: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


@cache
def has_gpu() -> bool:
    """A CUDA device torch can use. The one GPU check of tuneloop (engines, launchers and precision all ask it)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def settle_deepspeed_accelerator() -> None:
    """Tell DeepSpeed (which Transformers imports whenever it is installed) that a GPU-less machine is a CPU one:
    it then skips its accelerator probe and the warning that probe prints on stdout of every model load."""
    if "DS_ACCELERATOR" not in os.environ and not has_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


# oneDNN ISA caps below AVX512-BF16: with one of these set, bf16 matmuls are emulated even on an AMX CPU.
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are ~10x faster than fp32 on such CPUs (measured, docs/benchmarks.md);
    not when `ONEDNN_MAX_CPU_ISA` caps oneDNN below them."""
    import torch

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_CAPS_WITHOUT_BF16:
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def resolve_precision(requested: str) -> Precision:
    import torch

    if requested != "auto":
        return Precision(requested, "set in the config")
    if has_gpu():
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "CUDA device with bf16 support")
        return Precision("fp16", "CUDA device without bf16")
    if cpu_has_fast_bf16():
        return Precision("bf16", "CPU with AMX/AVX512-BF16")
    return Precision("fp32", "CPU without fast bf16")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container given 2 CPUs of a
    64-core host must not start 64 threads; torch's default counts the host's cores)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(int(quota), 1))
    return max(count, 1)


def _cgroup_cpu_quota() -> float | None:
    from pathlib import Path

    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text(encoding="utf-8"))
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def training_threads(requested: int | None, processes_on_this_machine: int) -> int:
    """Intra-op threads for one training process: `train.num_threads`, else its share of the available CPUs."""
    if requested:
        return requested
    return max(available_cpus() // max(processes_on_this_machine, 1), 1)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory, in MiB."""
    if has_gpu():
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def memory_per_process_mb(processes_on_this_machine: int) -> float:
    """What one training process may use: its own GPU, or its share of the host's memory."""
    if has_gpu():
        return available_memory_mb()
    return available_memory_mb() / max(processes_on_this_machine, 1)


def available_memory_mb() -> float:
    if has_gpu():
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    import psutil

    return psutil.virtual_memory().available / 2**20


def cpu_description() -> str:
    """The CPU model and the ISA features that decide training and serving speed here (benchmarks print it: a speed
    means nothing without the CPU it was measured on)."""
    import platform
    from pathlib import Path

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break  # the first CPU's: the others are the same
    features = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if name in flags]
    return f"{model} ({', '.join(features) or 'no AVX2'})"
