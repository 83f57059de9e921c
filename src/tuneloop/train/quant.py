"""4-bit (QLoRA) backends. bitsandbytes NF4 with double quantisation runs on CUDA and, since 0.4x, on CPU.

CPU trap (measured, see docs/training.md): a no-grad forward through a CPU `Linear4bit` (generation or an eval step)
repacks its weights into an inference-only layout, after which training runs through `gemv_4bit`, which has no
backward, and LoRA gradients silently go to ~0. Turning off `support_avx512bf16_for_cpu` on every 4-bit layer before
any eval pass avoids it; `disable_cpu_inference_repack` does that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tuneloop.errors import TuneloopError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FourBitBackend:
    name: str
    version: str
    device: str

    def describe(self) -> str:
        return f"{self.name} {self.version} NF4 + double quantisation on {self.device}"


def four_bit_backend() -> FourBitBackend | None:
    """The 4-bit backend that works on this machine, checked by quantising a small tensor, or None."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as functional
        import torch
    except Exception:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # Seeded, and the tolerance scaled to the largest value: NF4's widest step is ~0.28 of a block's absmax, so
        # an unseeded draw with a fixed tolerance failed now and then (one rank of a QLoRA+FSDP test refused).
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(64, 64, generator=generator).to(dtype=torch.bfloat16, device=device)
        packed, state = functional.quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
        restored = functional.dequantize_4bit(packed, state)
        if not torch.allclose(restored.float(), weights.float(), atol=0.2 * weights.abs().max().item()):
            return None
    except Exception as exc:
        log.debug("bitsandbytes cannot quantise on %s: %s", device, exc)
        return None
    return FourBitBackend("bitsandbytes", getattr(bnb, "__version__", "?"), device)


def require_four_bit_backend() -> FourBitBackend:
    backend = four_bit_backend()
    if backend is None:
        raise TuneloopError(
            "train.method=qlora needs a 4-bit backend, and none works on this machine "
            "(bitsandbytes is missing or cannot quantise here)",
            hint="install bitsandbytes (`pip install bitsandbytes`), or use train.method=lora; "
            "tuneloop never silently trains something other than what was asked",
        )
    return backend


def nf4_config(compute_dtype: Any, store_as_compute_dtype: bool = False) -> Any:
    """NF4 with double quantisation. `store_as_compute_dtype`: pack the 4-bit weights into tensors of the compute
    dtype (`bnb_4bit_quant_storage`), which FSDP and DeepSpeed ZeRO-3 need to shard them like other parameters."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if store_as_compute_dtype else torch.uint8,
    )


def disable_cpu_inference_repack(model: Any) -> int:
    """Keep CPU 4-bit layers trainable after eval passes (see module docstring). Returns how many were patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched
