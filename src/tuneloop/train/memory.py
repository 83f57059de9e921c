"""Memory preflight: estimate what a run needs before loading the model, and stop (or warn) with advice.

Estimate = weights + trainable-parameter state (fp32 master copy where needed, gradients, AdamW's two moments) +
activations. Activations follow Korthikanti et al. (2022) per layer: s*b*h*(34 + 5*a*s/h) bytes in 16-bit (x2 in
fp32), divided by the layer count with gradient checkpointing; plus the logits (b*s*vocab*4 bytes, x2 for the loss).
It is an estimate for a go/no-go decision, not a measurement; docs/benchmarks.md compares it with measured peaks.

Per rank, by `train.distributed.strategy` over N processes: `ddp` holds everything on every rank; `deepspeed_zero2`
divides gradients and optimizer state by N; `fsdp` and `deepspeed_zero3` divide the weights too, plus one layer
gathered at a time. `cpu_offload` moves the sharded state (and, for FSDP/ZeRO-3, the weights) to host memory, shown
separately. Activations are per rank in every strategy (data parallelism splits the batch, not the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneloop.errors import TuneloopError

MIB = 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's memory on its device (GPU, or the host on CPU), and what `cpu_offload` keeps in host memory."""

    weights_mb: float
    trainable_state_mb: float
    activations_mb: float
    overhead_mb: float
    offloaded_mb: float = 0.0

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.trainable_state_mb + self.activations_mb + self.overhead_mb


def estimate_memory(
    model_config: Any,
    method: str,
    lora_r: int,
    batch_size: int,
    seq_len: int,
    precision: str,
    checkpointing: bool,
    strategy: str = "ddp",
    world_size: int = 1,
    cpu_offload: bool = False,
) -> MemoryEstimate:
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    vocab = model_config.vocab_size
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    kv_heads = getattr(model_config, "num_key_value_heads", heads) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    per_layer = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2 + 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    params = layers * per_layer + embeddings
    half = precision in ("bf16", "fp16")
    weight_bytes = {"qlora": 0.5 + 0.05, "lora": 2 if half else 4, "full": 4}[method]
    weights = params * weight_bytes
    if method == "qlora":
        weights += embeddings * 1.5  # embeddings and head stay in 16 bit
    if method == "full":
        trainable = params
    else:
        # all-linear LoRA: r * (in + out) per adapted matrix (7 per decoder layer)
        adapted = heads * head_dim * 2 + kv_heads * head_dim * 2 + hidden * 4 + intermediate * 3
        trainable = layers * lora_r * adapted
    trainable_state = trainable * (4 + 4 + 8)  # fp32 weights, gradients, AdamW moments
    bytes_per_activation = 1 if half else 2
    activation_layer = seq_len * batch_size * hidden * (34 + 5 * heads * seq_len / hidden) * bytes_per_activation
    activations = activation_layer * (1 if checkpointing else layers) + batch_size * seq_len * vocab * 4 * 2
    weights, trainable_state, offloaded = _per_rank(
        weights, trainable_state, weights / max(layers, 1), strategy, max(world_size, 1), cpu_offload
    )
    return MemoryEstimate(
        weights / MIB, trainable_state / MIB, activations / MIB, overhead_mb=600.0, offloaded_mb=offloaded / MIB
    )


def _per_rank(
    weights: float, state: float, layer: float, strategy: str, world: int, offload: bool
) -> tuple[float, float, float]:
    """(weights, trainable state, offloaded) bytes of one rank."""
    if strategy == "ddp" or (world == 1 and not offload):
        return weights, state, 0.0
    if strategy == "deepspeed_zero2":
        sharded_state = state / world
        return weights, (0.0 if offload else sharded_state), (sharded_state if offload else 0.0)
    # fsdp and deepspeed_zero3: everything sharded; one layer is gathered at a time for compute.
    sharded = weights / world + state / world
    if offload:
        return layer, 0.0, sharded
    return weights / world + layer, state / world, 0.0


# The share of the available memory an estimate may take before the preflight warns (the estimate is rough).
FITS_SHARE = 0.8


def fits(estimate: MemoryEstimate, available_mb: float, host_offload: bool) -> bool:
    """Whether the estimate fits; with `host_offload` (a CPU run) what `cpu_offload` moves is the same memory."""
    return needed_mb(estimate, host_offload) <= FITS_SHARE * available_mb


def needed_mb(estimate: MemoryEstimate, host_offload: bool) -> float:
    return estimate.total_mb + (estimate.offloaded_mb if host_offload else 0.0)


def preflight(estimate: MemoryEstimate, available_mb: float, mode: str, host_offload: bool = False) -> str | None:
    """Returns a warning to show, raises when the run will not fit and mode is "stop"."""
    if mode == "off" or fits(estimate, available_mb, host_offload):
        return None
    message = (
        f"memory preflight: the run needs ~{needed_mb(estimate, host_offload):,.0f} MiB per process "
        f"(weights {estimate.weights_mb:,.0f}, optimizer+grads {estimate.trainable_state_mb:,.0f}, "
        f"activations {estimate.activations_mb:,.0f}) and {available_mb:,.0f} MiB are available"
    )
    advice = (
        "lower train.batch_size (raise train.grad_accum to keep the effective batch), lower data.max_seq_len, "
        "turn on train.gradient_checkpointing, or use train.method=qlora; train.preflight=warn runs anyway"
    )
    if needed_mb(estimate, host_offload) > available_mb and mode == "stop":
        raise TuneloopError(message, hint=advice)
    return f"{message}; {advice}"
