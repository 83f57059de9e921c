"""Training throughput and peak memory: tuneloop's LoRA recipe against the common hand-written recipe, same rows.

Baseline (what most tutorials do): Transformers Trainer + PEFT LoRA r=16, alpha=32 on q/k/v/o, every row padded to
max length, fp32 weights. tuneloop: `train_model` with its defaults (packing, precision auto, all-linear LoRA r=16)
and the same r/alpha on q/k/v/o; plus QLoRA (NF4) for peak memory. Model: the bundled SmolLM2-135M-Instruct. Rows:
SST-2 train sentences as instruction rows (../shared/data/sst2). Each variant runs in its own process, so peak RSS
is its own. Tokens/s counts real (non-padding) tokens.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import sst2

MAX_LEN = 256
BATCH = 4
VARIANTS = ("baseline", "tuneloop", "tuneloop-qkvo", "tuneloop-qlora")


def config_for(variant: str, workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    train: dict[str, Any] = {
        "max_steps": steps,
        "batch_size": BATCH,
        "learning_rate": 2e-4,
        "eval_every": steps,
        "save_every": steps,
        "report_to": [],
        "lora": {"r": 16, "alpha": 32},
    }
    if variant == "tuneloop-qkvo":
        train["lora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if variant == "tuneloop-qlora":
        train["method"] = "qlora"
    return {
        "project": {"name": f"bench-{variant}"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {
            "sources": [sst2.source(rows)],
            "max_seq_len": MAX_LEN,
            "packing": True,
            "val_fraction": 0.05,
        },
        "train": train,
    }


def run_tuneloop(variant: str, workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    from rich.console import Console

    from tuneloop.config_file import load_config
    from tuneloop.train.recipe import train_model
    from tuneloop.workspace import Workspace

    path = workdir / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config_for(variant, workdir, steps, rows)))
    result = train_model(load_config(path), Workspace(workdir / "ws"), console=Console(stderr=True, quiet=True))
    return {
        "tokens_per_second": result.tokens_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "tokens": result.tokens,
        "steps": result.steps,
        "precision": result.precision,
        "estimate_mb": result.memory_estimate_mb,
        "weights_mb": result.model_memory_mb,
    }


def run_baseline(workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    """Plain Trainer + PEFT, padding to max length, fp32: no tuneloop code in the training path."""
    import csv

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tuneloop.device import peak_memory_mb
    from tuneloop.models import materialize, resolve_base
    from tuneloop.workspace import Workspace

    folder = materialize(resolve_base("smollm2-135m-instruct", Workspace(workdir / "ws")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    labels = {"0": "negative", "1": "positive"}
    with sst2.TRAIN_TSV.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        texts = [
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": f"{sst2.INSTRUCTION}\n\n{row['sentence']}"},
                    {"role": "assistant", "content": labels[row["label"]]},
                ],
                tokenize=False,
            )
            for _, row in zip(range(rows), reader, strict=False)
        ]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LEN, add_special_tokens=False)
    dataset = Dataset.from_dict(dict(encoded))
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights_mb = round(model.get_memory_footprint() / 2**20, 1)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    real_tokens = {"count": 0}

    class CountingCollator(DataCollatorForLanguageModeling):
        def __call__(self, features: Any, return_tensors: Any = None) -> Any:
            batch = super().__call__(features, return_tensors)
            real_tokens["count"] += int(batch["attention_mask"].sum())
            return batch

    class Timer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            Timer.seconds = time.perf_counter() - self.started

    args = TrainingArguments(
        output_dir=str(workdir / "baseline"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=2e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=steps,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CountingCollator(tokenizer, mlm=False),
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "tokens_per_second": round(real_tokens["count"] / Timer.seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "tokens": real_tokens["count"],
        "steps": steps,
        "precision": "fp32",
        "estimate_mb": None,
        "weights_mb": weights_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used internally)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.variant:
        if args.variant == "baseline":
            result = run_baseline(args.workdir, args.steps, args.rows)
        else:
            result = run_tuneloop(args.variant, args.workdir, args.steps, args.rows)
        print("RESULT " + json.dumps(result))
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--workdir",
                    tmp,
                    "--steps",
                    str(args.steps),
                    "--rows",
                    str(args.rows),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[variant] = json.loads(output.split("RESULT ", 1)[1])
            print(f"{variant}: {results[variant]}", file=sys.stderr)
    from rich.console import Console
    from rich.table import Table

    baseline = results["baseline"]["tokens_per_second"]
    lora_memory = results["tuneloop"]["peak_memory_mb"]
    table = Table(title=f"LoRA training on SmolLM2-135M, {args.steps} steps x batch {BATCH}, max_len {MAX_LEN}")
    for column in (
        "recipe",
        "precision",
        "real tokens/s",
        "vs baseline",
        "weights MiB",
        "peak RSS MiB",
        "preflight estimate MiB",
    ):
        table.add_column(column)
    names = {
        "baseline": "Trainer+PEFT, q/k/v/o, pad to max_len, fp32 (baseline)",
        "tuneloop": "tuneloop default (packing, auto precision, all-linear)",
        "tuneloop-qkvo": "tuneloop, q/k/v/o",
        "tuneloop-qlora": "tuneloop QLoRA (NF4, all-linear)",
    }
    for variant, result in results.items():
        table.add_row(
            names[variant],
            result["precision"],
            f"{result['tokens_per_second']:,.0f}",
            f"{result['tokens_per_second'] / baseline:.2f}x",
            f"{result['weights_mb']:,.0f}",
            f"{result['peak_memory_mb']:,.0f}",
            str(result["estimate_mb"] or "-"),
        )
    Console(width=200).print(table)
    print(
        f"QLoRA / LoRA: weights {results['tuneloop-qlora']['weights_mb'] / results['tuneloop']['weights_mb']:.2f}, "
        f"peak RSS {results['tuneloop-qlora']['peak_memory_mb'] / lora_memory:.2f}"
    )


if __name__ == "__main__":
    main()
