"""Evaluation on a GPU: does `tuneloop eval`'s in-process path run on the GPU, and how fast does it generate?

Run on a GPU machine (the `device` tool's H100/H200; no hub there, so no real large weights):
    PYTHONPATH=src python benchmarks/eval_gpu.py --tokenizer DIR [--shape llama-3-8b] [--rows 64]

1. The load path: a small model folder saved here is loaded through `tuneloop.evaluate.generate.load_for_eval` (the
   function `tuneloop eval` uses) with a PEFT adapter; it must come back on the GPU, and `generate`/`perplexity` run.
2. Throughput at real shapes with random weights: a Llama-3-8B-shaped model (bf16, randomly initialised, a LoRA r16
   adapter on all linear layers, unmerged as evaluation runs it) generates `--new-tokens` greedy tokens for `--rows`
   prompts through the same `generate` function at several batch sizes, and `perplexity` runs on 256-token rows.
   Random weights never emit EOS, so every row generates the full budget: rows/s is per 128-token answer.
Prints the GPU, a table, and the speed-up of the largest batch over batch 1 (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)


def prompts(count: int) -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": f"Question {i}: summarise the following review in one sentence. The food was "
                f"{'great' if i % 2 else 'cold'} and the service {'quick' if i % 3 else 'slow'}; table {i} waited.",
            }
        ]
        for i in range(count)
    ]


def check_load_path(tokenizer_dir: Path) -> dict[str, Any]:
    """load_for_eval -> GPU, with an adapter, through a saved folder (what `tuneloop eval --model RUN` does)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneloop.evaluate.generate import generate, load_for_eval, perplexity
    from tuneloop.registry.refs import ModelSpec

    with tempfile.TemporaryDirectory() as folder:
        base, adapter = Path(folder) / "base", Path(folder) / "adapter"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPES["smollm2-135m"], "num_hidden_layers": 2}))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        tuned = lora(model)
        tuned.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        loaded, loaded_tokenizer = load_for_eval(ModelSpec("gpu-check", "tuned", base, adapter=adapter), torch.bfloat16)
        device = str(next(loaded.parameters()).device)
        answers = generate(loaded, loaded_tokenizer, prompts(4), 8, 4)
        rows = [{"input_ids": list(range(10, 60)), "labels": [-100] * 25 + list(range(35, 60))} for _ in range(4)]
        ppl = perplexity(loaded, rows, loaded_tokenizer.pad_token_id or 0, 4)
    return {"device": device, "answers": len(answers), "new_tokens": [a.new_tokens for a in answers], **ppl}


def throughput(shape: str, tokenizer_dir: Path, rows: int, new_tokens: int, batches: list[int]) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneloop.evaluate.generate import generate, perplexity

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], torch_dtype=torch.bfloat16)).to(torch.bfloat16)
    model = lora(model).eval()
    results = []
    generate(model, tokenizer, prompts(2), 4, 2)  # warm-up: kernels, allocator
    for batch in batches:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        count = rows if batch > 1 else min(rows, 8)  # one at a time is slow: 8 rows show its rate
        answers = generate(model, tokenizer, prompts(count), new_tokens, batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(a.new_tokens for a in answers)
        results.append(
            {
                "shape": shape,
                "what": f"generate, batch {batch}",
                "rows": count,
                "seconds": round(seconds, 2),
                "rows_per_s": round(count / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            }
        )
    scored = [{"input_ids": list(range(100, 356)), "labels": [-100] * 128 + list(range(228, 356))}] * rows
    torch.cuda.synchronize()
    started = time.perf_counter()
    perplexity(model, scored, tokenizer.pad_token_id or 0, 16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    results.append(
        {
            "shape": shape,
            "what": "perplexity, batch 16 x 256 tokens",
            "rows": rows,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 2),
            "tokens_per_s": round(rows * 256 / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
    )
    del model
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="A tokenizer folder with a chat template.")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="Model shapes (default: both).")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    arguments = parser.parse_args()
    import torch

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    load = check_load_path(arguments.tokenizer)
    print(f"load_for_eval: model on {load['device']}, {load['answers']} answers, perplexity {load['perplexity']:.1f}")
    assert load["device"].startswith("cuda"), "evaluation did not put the model on the GPU"
    batches = [int(b) for b in arguments.batches.split(",")]
    results = []
    for shape in arguments.shape or ["smollm2-135m", "llama-3-8b"]:
        results += throughput(shape, arguments.tokenizer, arguments.rows, arguments.new_tokens, batches)
    print("\n| shape | what | rows | seconds | rows/s | tokens/s | peak GiB |\n|---|---|---:|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['shape']} | {row['what']} | {row['rows']} | {row['seconds']} | {row['rows_per_s']} | "
            f"{row['tokens_per_s']} | {row['peak_gib']} |"
        )
    for shape in {row["shape"] for row in results}:
        generated = [row for row in results if row["shape"] == shape and row["what"].startswith("generate")]
        print(
            f"{shape}: batch {batches[-1]} vs batch 1: {generated[-1]['rows_per_s'] / generated[0]['rows_per_s']:.1f}x"
        )
    if arguments.json:
        arguments.json.write_text(json.dumps({"load": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
