"""The LM head and the loss only where labels are supervised (`train.logits: supervised`).

A causal LM's forward projects every position onto the vocabulary (49,152 wide for SmolLM2) and the loss then
ignores the positions whose label is -100: the prompt, the chat template, packing's padding. On short
instruction rows most positions are such, so most of the head's compute (about a fifth of the forward of a 135M
model) and the fp32 logits buffer are wasted. Here the hidden states are taken at the head's input, only the
supervised positions are projected, in chunks whose logits are recomputed in backward rather than kept, and the
loss is the same token-summed cross entropy Transformers computes (`ForCausalLMLoss`), normalised by the tokens of
the whole accumulated batch (`num_items_in_batch`).
"""

from __future__ import annotations

from typing import Any

from tuneloop.data.render import IGNORE_INDEX

CHUNK_TOKENS = 1024  # logits of one chunk: 1,024 x 49,152 fp32 = 192 MiB

# Config attributes of models whose logits are not just `lm_head(hidden)`; their own forward is kept for them
# (Gemma's soft-capping is reproduced below, the others are rare).
_SCALED_LOGITS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def supports_supervised_head(model: Any) -> str | None:
    """None when the supervised-only head applies to `model`, else why not (the run then computes full logits)."""
    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        return "the model has no output embedding to call on its own"
    for name in _SCALED_LOGITS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model scales its logits ({name}={value})"
    return None


def supervised_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, unwrapped: Any = None) -> Any:
    """Token-summed next-token cross entropy over the supervised positions of `inputs` (which holds `labels`),
    divided by `num_items_in_batch` (all supervised tokens of the accumulated batch) or, without it, by this
    batch's supervised tokens. `model` is called (it may be a DDP or DeepSpeed wrapper); `unwrapped` is the model
    inside it, whose head and config are read."""
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    unwrapped = unwrapped if unwrapped is not None else model
    head = unwrapped.get_output_embeddings()
    captured: dict[str, Any] = {}

    def keep_supervised_rows(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured["hidden"] = hidden[:, :-1][supervised]
        return (hidden[:, :0], *args[1:])  # the model's own head projects nothing

    handle = head.register_forward_pre_hook(keep_supervised_rows)
    try:
        model(**{key: value for key, value in inputs.items() if key != "labels"})
    finally:
        handle.remove()
    hidden = captured["hidden"]
    wanted = targets[supervised]
    softcap = getattr(getattr(unwrapped, "config", None), "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    if len(wanted) <= CHUNK_TOKENS:
        total = total + _chunk_loss(head, hidden, wanted, softcap)
    else:
        from torch.utils.checkpoint import checkpoint

        for start in range(0, len(wanted), CHUNK_TOKENS):
            stop = start + CHUNK_TOKENS
            total = total + checkpoint(
                _chunk_loss, head, hidden[start:stop], wanted[start:stop], softcap, use_reentrant=False
            )
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(supervised.sum()), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def _chunk_loss(head: Any, hidden: Any, targets: Any, softcap: float | None) -> Any:
    import torch.nn.functional as functional

    weight = getattr(head, "weight", None)
    if weight is not None and hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)  # autocast covered the model's forward, not this call
    logits = head(hidden).float()
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    return functional.cross_entropy(logits, targets, reduction="sum")


def supervised_head_trainer(trainer_class: Any) -> Any:
    """`trainer_class` (Transformers' Trainer or a subclass) computing its loss with `supervised_loss`."""

    class SupervisedHeadTrainer(trainer_class):  # type: ignore[misc, valid-type]
        loss_is_scaled_for_ga = True  # divided by the supervised tokens of the whole accumulated batch

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            loss = supervised_loss(model, inputs, num_items_in_batch, self.accelerator.unwrap_model(model))
            if num_items_in_batch is None and model.training:
                loss = loss / self.current_gradient_accumulation_steps  # a per-batch mean
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
            return (loss, {"loss": loss}) if return_outputs else loss

    return SupervisedHeadTrainer
