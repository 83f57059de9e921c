"""A 4-bit-weight (W4A16) checkpoint of a merged model by GPTQ or AWQ through llm-compressor, in the
compressed-tensors format vLLM loads (`--quantization compressed-tensors` is read from its config).

Run as a script by the quantisation virtualenv (`make quant`: .venv-quant), never imported by tuneloop:
llm-compressor pins its own Transformers, older than tuneloop's. It reads calibration texts (JSON Lines, `text`),
quantises, measures what 4 bits cost on held-out texts (top-1 next-token agreement with the original model and the
mean KL divergence of the next-token distributions), saves, reloads the saved checkpoint to check it reads back to the
same logits, and prints one JSON object for `tuneloop registry export --format gptq|awq`.

    .venv-quant/bin/python w4a16_quantize.py MERGED_FOLDER OUT --method gptq|awq --calibration texts.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GROUP_SIZES = (128, 64, 32, 16)  # the largest that divides every quantised layer's input width is used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", choices=("gptq", "awq"), required=True)
    parser.add_argument("--calibration", type=Path, required=True, help="JSON Lines with a `text` per row")
    parser.add_argument("--samples", type=int, default=128, help="calibration texts used (the rest are held out)")
    parser.add_argument("--held-out", type=int, default=16, help="texts kept for the agreement check")
    parser.add_argument("--max-seq-length", type=int, default=512)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [json.loads(line)["text"] for line in args.calibration.read_text().splitlines() if line.strip()]
    held_out, calibration = texts[: args.held_out], texts[args.held_out :][: args.samples]
    if not calibration:
        sys.exit(f"{args.calibration}: {len(texts)} texts; need more than --held-out {args.held_out}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    encoded = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=args.max_seq_length) for text in held_out
    ]
    with torch.no_grad():
        reference = [model(**batch).logits.float() for batch in encoded]

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster GPU transfers, which fails on a machine with no
        # accelerator; pinning only ever helps host-to-GPU copies, so without a GPU it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]

    group_size = _group_size(model)
    dataset = Dataset.from_dict({"text": calibration}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=args.max_seq_length, add_special_tokens=False),
        remove_columns=["text"],
    )
    oneshot(
        model=model,
        dataset=dataset,
        recipe=_recipe(args.method, group_size),
        max_seq_length=args.max_seq_length,
        num_calibration_samples=len(calibration),
        pipeline="basic",
    )
    with torch.no_grad():
        quantised = [model(**batch).logits.float() for batch in encoded]
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        read_back = [reloaded(**batch).logits.float() for batch in encoded]
    print(
        json.dumps(
            {
                "method": args.method,
                "scheme": "W4A16" if args.method == "gptq" else "W4A16_ASYM",
                "group_size": group_size,
                "calibration_texts": len(calibration),
                "held_out_texts": len(held_out),
                **_agreement(reference, quantised),
                "read_back_max_abs_diff": max(
                    float((a - b).abs().max()) for a, b in zip(quantised, read_back, strict=True)
                ),
                "size_bytes": sum(path.stat().st_size for path in args.out.rglob("*.safetensors")),
            }
        )
    )


def _group_size(model: Any) -> int:
    import torch

    widths = {
        module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    for size in GROUP_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    sys.exit(f"no group size in {GROUP_SIZES} divides every layer width {sorted(widths)}")


def _recipe(method: str, group_size: int) -> list[Any]:
    """GPTQ: symmetric int4 groups (the layout of GPTQ checkpoints); AWQ: activation-aware scaling, then
    asymmetric int4 groups (AWQ's layout)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    symmetric = method == "gptq"
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group_size,
            },
        }
    }
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def _agreement(reference: list[Any], quantised: list[Any]) -> dict[str, float]:
    import torch

    same = total = 0
    divergence = 0.0
    for original, changed in zip(reference, quantised, strict=True):
        same += int((original.argmax(-1) == changed.argmax(-1)).sum())
        total += original.shape[1]
        divergence += float(  # KL(original || quantised), summed over positions
            torch.nn.functional.kl_div(
                changed.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="sum"
            )
        )
    return {"top1_agreement": same / total, "mean_kl": divergence / total}


if __name__ == "__main__":
    main()
