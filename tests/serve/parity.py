"""Parity of a served model with PEFT: a greedy answer from another engine must be, token by token, PEFT's own
greedy choice, or within `tolerance` nats of it (engines in other precisions or batch shapes may break near-ties the
other way; a wrong adapter is off by whole nats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PeftReference:
    """Base + adapter in fp32 with PEFT; `adapter=False` in `check` scores with the adapter disabled (the base)."""

    def __init__(self, base_folder: Path, adapter: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        self.model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32), adapter
        ).eval()

    def check(self, messages: list[dict[str, str]], answer: str, tolerance: float, adapter: bool = True) -> None:
        import torch

        tokenizer = self.tokenizer
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            if adapter:
                logits = self.model(inputs).logits[0]
            else:
                with self.model.disable_adapter():
                    logits = self.model(inputs).logits[0]
        logprobs: Any = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
        for step, token in enumerate(answer_ids):
            gap = float(logprobs[step].max() - logprobs[step, token])
            assert gap <= tolerance, (
                f"{'adapter' if adapter else 'base'}: token {step} ({tokenizer.decode([token])!r}) is {gap:.3f} nats "
                f"below PEFT's greedy choice ({tokenizer.decode([int(logprobs[step].argmax())])!r}) in {answer!r}"
            )
