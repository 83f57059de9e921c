"""Loading an evaluated model, batched greedy generation, perplexity and latency on this machine."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from tuneloop.models import load_model, load_saved_tokenizer, pad_token_id
from tuneloop.registry.refs import ModelSpec


@dataclass
class Generation:
    text: str
    new_tokens: int
    hit_max_tokens: bool  # stopped by the budget, not by EOS


def load_for_eval(spec: ModelSpec, dtype: Any) -> tuple[Any, Any]:
    tokenizer = load_saved_tokenizer(spec.tokenizer_folder, spec.trust_remote_code)
    adapters = {"default": spec.adapter} if spec.adapter is not None else None
    model = load_model(spec.weights, dtype=dtype, adapters=adapters, trust_remote_code=spec.trust_remote_code)
    from tuneloop.device import has_gpu

    if has_gpu():  # evaluation on a GPU machine runs on the GPU; inputs follow the model (`_on`)
        model = model.to("cuda")
    return model.eval(), tokenizer


def _on(model: Any, batch: Any) -> Any:
    """A tokenized batch on the model's device."""
    return batch.to(model.device)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    progress: Any = None,
    stop: list[str] | None = None,
) -> list[Generation]:
    """Greedy, batched (left padding). Prompts are message lists rendered with the chat template. Generation ends at
    EOS, at `max_new_tokens`, or at the first of the `stop` strings (not part of the answer), as an engine's does."""
    import torch

    from tuneloop.evaluate.budget import truncate_at_stop

    tokenizer.padding_side = "left"
    pad_id = pad_token_id(tokenizer)
    stop_ids = {tokenizer.eos_token_id}
    # Transformers stops a row at a stop string and pads it from there on; the padding is not generated text.
    stopping = {"stop_strings": stop, "tokenizer": tokenizer} if stop else {}
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in prompts[start : start + batch_size]
        ]
        batch = _on(model, tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        with torch.no_grad():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, **stopping
            )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            ended = next((i for i, token in enumerate(row) if token in stop_ids), None)
            kept = row if ended is None else row[:ended]
            while kept and kept[-1] == pad_id:
                kept = kept[:-1]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            answer = truncate_at_stop(text, stop or [])
            stopped = answer != text.strip()
            results.append(Generation(answer, len(kept), hit_max_tokens=ended is None and not stopped))
        if progress is not None:
            progress(len(texts))
    return results


def perplexity(model: Any, rows: list[dict[str, list[int]]], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted perplexity over the tokens that carry loss (assistant turns): exp(sum NLL / count)."""
    import torch

    from tuneloop.data.collate import collate_padded

    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {
            name: tensor.to(model.device)
            for name, tensor in collate_padded(rows[start : start + batch_size], pad_token_id).items()
        }
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shifted_labels = batch["labels"][:, 1:].reshape(-1)
        total_nll += float(
            torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
        )
        total_tokens += int((shifted_labels != -100).sum())
    mean_nll = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "perplexity_tokens": total_tokens}


def latency(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], new_tokens: int = 32) -> dict[str, float]:
    """Single-request latency here: time to first token (prefill + 1 step) and decode tokens/s, median of prompts."""
    import torch

    first, rates = [], []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = _on(model, tokenizer(text, return_tensors="pt", add_special_tokens=False))
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=pad_token_id(tokenizer))
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            output = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id(tokenizer),
            )
            elapsed = time.perf_counter() - started
        rates.append((output.shape[1] - batch["input_ids"].shape[1]) / elapsed)
    return {"ttft_s": statistics.median(first), "tokens_per_second": statistics.median(rates)}
