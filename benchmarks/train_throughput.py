"""Training throughput: tuneloop's default LoRA recipe against TRL's `SFTTrainer` in its best CPU configuration and
the common hand-written recipe, on the same rows, and each of tuneloop's speed levers turned off one at a time.

Rows: the first 2,000 SST-2 train sentences as instruction rows (../shared/data/sst2), model: the bundled
SmolLM2-135M-Instruct, LoRA r=16, alpha=32 on all linear layers (q/k/v/o for the hand-written recipe, as tutorials
write it). Every variant runs in its own process (peak RSS is its own), batch 4, `--steps` optimizer steps; tokens/s
counts real (non-padding) tokens over training time after the first step (which compiles, where a variant
compiles; its time is printed apart).

- `trl`: TRL `SFTTrainer`, packing (best-fit decreasing) with `padding_free`, completion-only loss, LoRA dropout 0,
  bf16 weights and autocast where the CPU has AMX/AVX512-BF16 else fp32, `max_length` = tuneloop's packing length.
- `naive`: Transformers `Trainer` + PEFT on q/k/v/o, every row padded to 256 tokens, fp32.
- `tuneloop`: `train_model` with no `train` settings but the step count; the other rows change one setting.

TRL is a benchmark-only dependency: the script installs it into this venv when missing. `--isa avx2` restricts
oneDNN, MKL and ATen to AVX2 in the child processes (the same cores with their AVX-512/AMX paths switched off: an
emulation of an AVX2-only CPU's instruction set, not of its clock or memory).

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--rows 2000] [--isa native|avx2] [--variants a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import sst2

NAIVE_MAX_LEN = 256
BATCH = 4
TRL_VERSION = "1.16.0"
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ALLOCATORS = {
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
}

# variant -> (what it is, tuneloop overrides as dotted keys)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("Trainer+PEFT q/k/v/o, rows padded to 256, fp32 (hand-written)", {}),
    "trl": ("TRL SFTTrainer, packing + padding_free, best precision", {}),
    "tuneloop": ("tuneloop defaults", {}),
    "full-logits": ("tuneloop, train.logits: all", {"train.logits": "all"}),
    "no-compile": ("tuneloop, train.compile: false", {"train.compile": False}),
    "lora-dropout": ("tuneloop, lora.dropout: 0.05 (compile auto: off)", {"train.lora.dropout": 0.05}),
    "pack-1024": ("tuneloop, data.packing_length: 1024", {"data.packing_length": 1024}),
    "unpacked": ("tuneloop, data.packing: false (padded per batch)", {"data.packing": False}),
    "other-precision": ("tuneloop, the precision auto did not pick", {}),
    "one-thread": ("tuneloop, train.num_threads: 1", {"train.num_threads": 1}),
    "tcmalloc": ("tuneloop, LD_PRELOAD tcmalloc", {}),
    "jemalloc": ("tuneloop, LD_PRELOAD jemalloc", {}),
    "qlora": ("tuneloop QLoRA (NF4 + double quant)", {"train.method": "qlora"}),
}
OTHER_PRECISION_STEPS = 4  # bf16 on an AVX2-only CPU is emulated: > 1 min a step


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def config_for(variant: str, steps: int, rows: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "project": {"name": f"bench-{variant}"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [sst2.source(rows)], "val_fraction": 0.05},
        "train": {"max_steps": steps, "eval_every": steps, "report_to": []},
    }
    for dotted, value in VARIANTS[variant][1].items():
        set_dotted(config, dotted, value)
    if variant == "other-precision":
        from tuneloop.device import resolve_precision

        config["train"]["precision"] = "fp32" if resolve_precision("auto").name == "bf16" else "bf16"
    return config


def run_tuneloop(variant: str, workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    from rich.console import Console

    from tuneloop.config_file import load_config
    from tuneloop.train.recipe import train_model
    from tuneloop.workspace import Workspace

    path = workdir / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config_for(variant, steps, rows)))
    result = train_model(load_config(path), Workspace(workdir / "ws"), console=Console(stderr=True, quiet=True))
    return {
        "tokens_per_second": result.tokens_per_second,
        "first_step_seconds": result.first_step_seconds,
        "compiled": result.compiled,
        "peak_memory_mb": result.peak_memory_mb,
        "tokens": result.tokens,
        "steps": result.steps,
        "precision": result.precision,
        "weights_mb": result.model_memory_mb,
    }


class StepTimer:
    """A Trainer callback: real tokens and seconds after the first step (as tuneloop reports them)."""

    def __init__(self, counted: dict[str, int]) -> None:
        self.counted = counted
        self.first_step: float | None = None
        self.after_first = (0.0, 0)
        self.seconds = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                timer.started = time.perf_counter()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                if timer.first_step is None:
                    timer.first_step = time.perf_counter() - timer.started
                    timer.after_first = (time.perf_counter(), timer.counted["tokens"])

            def on_train_end(self, *args: Any, **kwargs: Any) -> None:
                began, tokens = timer.after_first
                timer.seconds = time.perf_counter() - began
                timer.tokens = timer.counted["tokens"] - tokens

        return Timer()

    def tokens_per_second(self) -> float:
        return round(self.tokens / max(self.seconds, 1e-9), 1)

    def result(self, steps: int, precision: str, weights_mb: float | None) -> dict[str, Any]:
        """A variant's line of the table (a plain-Trainer recipe: nothing compiled)."""
        from tuneloop.device import peak_memory_mb

        return {
            "tokens_per_second": self.tokens_per_second(),
            "first_step_seconds": round(self.first_step or 0.0, 1),
            "compiled": False,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "tokens": self.counted["tokens"],
            "steps": steps,
            "precision": precision,
            "weights_mb": weights_mb,
        }


def run_trl(workdir: Path, steps: int, rows: int) -> dict[str, Any]:
    """TRL's SFTTrainer as its docs recommend for speed: packing (bfd) + padding_free, completion-only loss."""
    import csv

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneloop.device import resolve_precision
    from tuneloop.models import materialize, resolve_base
    from tuneloop.workspace import Workspace

    precision = resolve_precision("auto")
    folder = materialize(resolve_base("smollm2-135m-instruct", Workspace(workdir / "ws")))
    labels = {"0": "negative", "1": "positive"}
    with sst2.TRAIN_TSV.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        records = [
            {
                "prompt": [{"role": "user", "content": f"{sst2.INSTRUCTION}\n\n{row['sentence']}"}],
                "completion": [{"role": "assistant", "content": labels[row["label"]]}],
            }
            for _, row in zip(range(rows), reader, strict=False)
        ]
    dtype = torch.bfloat16 if precision.name == "bf16" else torch.float32
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=2e-4,
        max_length=packing_length(workdir, rows),
        packing=True,
        padding_free=True,
        bf16=precision.name == "bf16",
        model_init_kwargs={"dtype": dtype},
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(records), peft_config=lora)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features: Any) -> Any:
        batch = collate(features)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    timer = StepTimer(counted)
    trainer.add_callback(timer.callback())
    trainer.train()
    return timer.result(steps, precision.name, weights_mb=None)


def packing_length(workdir: Path, rows: int) -> int:
    """tuneloop's packing length for these rows (written by the tuneloop variant's prepare; 256 for SST-2)."""
    from tuneloop.workspace import DatasetPaths, Workspace

    for folder in Workspace(workdir / "ws").datasets.glob("ds-*"):
        length = json.loads(DatasetPaths(folder).manifest.read_text())["packing"].get("length")
        if length:
            return int(length)
    return 256


def run_naive(workdir: Path, steps: int, rows: int) -> dict[str, Any]:
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
        TrainingArguments,
    )

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
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=NAIVE_MAX_LEN, add_special_tokens=False
    )
    dataset = Dataset.from_dict(dict(encoded))
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights_mb = round(model.get_memory_footprint() / 2**20, 1)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    counted = {"tokens": 0}

    class CountingCollator(DataCollatorForLanguageModeling):
        def __call__(self, features: Any, return_tensors: Any = None) -> Any:
            batch = super().__call__(features, return_tensors)
            counted["tokens"] += int(batch["attention_mask"].sum())
            return batch

    args = TrainingArguments(
        output_dir=str(workdir / "naive"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=2e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=steps,
    )
    timer = StepTimer(counted)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CountingCollator(tokenizer, mlm=False),
        callbacks=[timer.callback()],
    )
    trainer.train()
    return timer.result(steps, "fp32", weights_mb)


def ensure_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        print(f"installing trl=={TRL_VERSION} (benchmark-only dependency) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)


def child_environment(variant: str, isa: str) -> dict[str, str] | None:
    """The child's environment, or None when the variant cannot run here (its allocator is not installed)."""
    env = dict(os.environ)
    if isa == "avx2":
        env.update(AVX2_ONLY)
    if variant in ALLOCATORS:
        if not Path(ALLOCATORS[variant]).exists():
            return None
        env["LD_PRELOAD"] = ALLOCATORS[variant]
    return env


def run_variant(variant: str, workdir: Path, steps: int, rows: int, isa: str) -> dict[str, Any] | None:
    env = child_environment(variant, isa)
    if env is None:
        return None
    if variant == "other-precision":
        steps = min(steps, OTHER_PRECISION_STEPS)
    command = [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir), "--steps", str(steps)]
    command += ["--rows", str(rows)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"variant {variant} failed")
    return json.loads(completed.stdout.split("RESULT ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--variants", help="comma-separated subset (default: all)")
    parser.add_argument("--variant", choices=tuple(VARIANTS), help="run one variant in this process (internal)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.variant:
        if args.variant == "naive":
            result = run_naive(args.workdir, args.steps, args.rows)
        elif args.variant == "trl":
            result = run_trl(args.workdir, args.steps, args.rows)
        else:
            result = run_tuneloop(args.variant, args.workdir, args.steps, args.rows)
        print("RESULT " + json.dumps(result))
        return
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    ordered = ["tuneloop"] + [name for name in chosen if name != "tuneloop"]  # it prepares the data TRL reuses
    if "trl" in ordered:
        ensure_trl()
    results: dict[str, dict[str, Any] | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ordered:
            results[variant] = run_variant(variant, Path(tmp), args.steps, args.rows, args.isa)
            print(f"{variant}: {results[variant]}", file=sys.stderr)
    print_table(results, args)


def print_table(results: dict[str, dict[str, Any] | None], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from tuneloop.device import cpu_description

    cpu = cpu_description()
    if args.isa == "avx2":
        cpu += " restricted to AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS)"
    console = Console(width=200)
    console.print(f"CPU: {cpu}; torch threads by default: {_threads()}")

    def speed(name: str) -> float | None:
        result = results.get(name)
        return result["tokens_per_second"] if result else None

    trl, naive, default = speed("trl"), speed("naive"), speed("tuneloop")
    table = Table(title=f"LoRA training on SmolLM2-135M, {args.rows} SST-2 rows, {args.steps} steps x batch {BATCH}")
    for column in ("recipe", "precision", "compiled", "real tokens/s", "vs TRL", "vs hand-written",
                   "vs tuneloop default", "first step s", "weights MiB", "peak RSS MiB"):  # fmt: skip
        table.add_column(column)
    for variant, result in results.items():
        label = VARIANTS[variant][0]
        if result is None:
            table.add_row(label, "-", "-", "not installed", "", "", "", "", "", "")
            continue
        tps = result["tokens_per_second"]
        table.add_row(
            label,
            result["precision"],
            "yes" if result["compiled"] else "no",
            f"{tps:,.0f}",
            f"{tps / trl:.2f}x" if trl else "-",
            f"{tps / naive:.2f}x" if naive else "-",
            f"{tps / default:.2f}x" if default else "-",
            f"{result['first_step_seconds']:.1f}",
            f"{result['weights_mb']:,.0f}" if result["weights_mb"] else "-",
            f"{result['peak_memory_mb']:,.0f}",
        )
    console.print(table)
    if trl and default:
        console.print(f"tuneloop default / TRL best: {default / trl:.2f}x (target >= 2x)")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
