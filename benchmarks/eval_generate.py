"""Evaluation generation: rows/s of the in-process path (`evaluate.generate`, batched as `tuneloop eval` runs it) against
the serving engines started for evaluation (`serve.offline.engine_endpoints`: llama.cpp's llama-server, vLLM when
.venv-vllm exists), on the same SST-2 validation rows, base and tuned, with a fixed budget of `--max-new-tokens` and
with the auto budget (`evaluate.budget`: tokens from the reference lengths, a newline stop for one-line answers), and
the parity of each engine's greedy answers with the in-process ones.

Model: the bundled SmolLM2-135M-Instruct. Adapter: `--adapter trained` (default) trains one with `tuneloop train` on
the first `--train-rows` SST-2 train sentences (`--steps` steps, defaults otherwise), so the tuned model answers with
a label and stops; `--adapter random` saves a PEFT LoRA with random non-zero A and B on q/k/v/o instead (it changes
every answer; nothing about its length). Evaluation rows: the first `--rows` rows of that dataset's validation split.
Every generator runs at `eval.precision` as tuneloop resolves it (`--precision` overrides): in-process weights in that
dtype, llama.cpp an f32/bf16 GGUF of the same weights, vLLM the same `--dtype`. Every generator stops at the auto
budget's stop strings (in-process through Transformers' `stop_strings`), as `tuneloop eval` does.
Engine start-up (GGUF conversion, server start) is timed apart from generation. rows/s counts generation only.

    .venv/bin/python benchmarks/eval_generate.py [--rows 48] [--max-new-tokens 128] [--engines inprocess,llamacpp,vllm]
        [--adapter trained|random] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import sst2

ENGINES = ("inprocess", "llamacpp", "vllm")
Prompts = list[list[dict[str, str]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--adapter", choices=["trained", "random"], default="trained")
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--workspace", type=Path, help="keep the workspace here (default: a temporary folder)")
    args = parser.parse_args()
    engines = [name for name in args.engines.split(",") if name]
    if "inprocess" not in engines:
        raise SystemExit("--engines must include inprocess: the ratios and parity are measured against it")
    folder = args.workspace or Path(tempfile.mkdtemp(prefix="eval-generate-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TUNELOOP_HOME"] = str(folder / "ws")

    from rich.console import Console

    from tuneloop.device import cpu_description, resolve_precision
    from tuneloop.errors import TuneloopError

    console = Console(width=200)
    console.print(
        f"CPU: {cpu_description()}, {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f} "
        "(machine shared with other jobs)"
    )
    config_file = write_config(folder, args)
    tuned_ref = train_adapter(config_file, folder) if args.adapter == "trained" else random_adapter(folder)

    from tuneloop.config_file import load_config
    from tuneloop.evaluate.budget import generation_budget, reference_token_lengths
    from tuneloop.models import load_saved_tokenizer
    from tuneloop.registry.refs import resolve_model_ref
    from tuneloop.workspace import Workspace

    config = load_config(config_file)
    workspace = Workspace(folder / "ws")
    prompts, references = validation_rows(config, workspace, args.rows)
    specs = [resolve_model_ref("base", config, workspace), resolve_model_ref(tuned_ref, config, workspace, "tuned")]
    tokenizer = load_saved_tokenizer(specs[0].tokenizer_folder, False)
    auto = generation_budget(config.eval, references, reference_token_lengths(tokenizer, references))
    budgets = {f"fixed {args.max_new_tokens}": (args.max_new_tokens, []), "auto": (auto.max_new_tokens, auto.stop)}
    precision = resolve_precision(config.eval.precision)
    console.print(
        f"{len(prompts)} SST-2 validation rows; adapter: {args.adapter} ({tuned_ref}); precision {precision.name} "
        f"({precision.reason}); auto budget: {auto.reason}"
    )
    results: list[dict[str, Any]] = []
    starts: dict[str, float] = {}
    results += run_in_process(specs, prompts, budgets, precision.torch_dtype, config.eval.batch_size, console)
    for engine in engines:
        if engine == "inprocess":
            continue
        if engine == "vllm" and not Path(".venv-vllm/bin/python").exists():
            console.print("vLLM: .venv-vllm is missing (make vllm); skipped")
            continue
        try:
            measured, starts[engine] = run_engine(engine, specs, config, workspace, prompts, budgets, console)
        except TuneloopError as error:  # one engine failing leaves the others' numbers
            console.print(f"{engine} failed: {error} ({error.hint})")
            continue
        results += measured
    print_results(results, starts, console, args, precision.name)
    console.print(f"load average at the end {os.getloadavg()[0]:.1f}")


def write_config(folder: Path, args: argparse.Namespace) -> Path:
    config = {
        "project": {"name": "eval-generate"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [sst2.source(args.train_rows)], "val_fraction": 0.15},
        "train": {"max_steps": args.steps},
        "eval": {
            "precision": args.precision,
            "max_new_tokens": args.max_new_tokens,
            "labels": ["positive", "negative"],
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_adapter(config_file: Path, folder: Path) -> str:
    tuneloop = Path(sys.executable).parent / "tuneloop"
    began = time.perf_counter()
    completed = subprocess.run(
        [str(tuneloop), "train", "-c", str(config_file), "--json"], capture_output=True, text=True, env=os.environ
    )
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        raise SystemExit("tuneloop train failed")
    print(f"trained the adapter in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    from tuneloop.workspace import Workspace

    run = Workspace(folder / "ws").latest_finished_run()
    assert run is not None, completed.stdout
    return run


def random_adapter(folder: Path) -> str:
    """A PEFT LoRA (r 16, alpha 32, q/k/v/o) with random non-zero A and B: it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneloop.config_file import load_config
    from tuneloop.models import configured_base, load_saved_tokenizer, materialize
    from tuneloop.workspace import Workspace

    base = materialize(configured_base(load_config(folder / "config.yaml"), Workspace(folder / "ws")))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # init_lora_weights=False: B random too, not PEFT's zeros (which would change nothing)
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    out = folder / "random-adapter"
    model.save_pretrained(out)
    load_saved_tokenizer(base, False).save_pretrained(out)
    return str(out)


def validation_rows(config: Any, workspace: Any, limit: int) -> tuple[Prompts, list[str]]:
    """The prepared validation split's chat rows: prompt messages and the reference (last assistant turn)."""
    from tuneloop.data.prepare import prepare_dataset

    prepared = prepare_dataset(config, workspace)
    prompts, references = [], []
    for line in prepared.paths.conversations("val").read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
    return prompts[:limit], references[:limit]


def run_in_process(
    specs: list[Any], prompts: Prompts, budgets: dict[str, Any], dtype: Any, batch_size: int, console: Any
) -> list[dict[str, Any]]:
    from tuneloop.evaluate.generate import generate, load_for_eval

    results = []
    for spec in specs:
        model, tokenizer = load_for_eval(spec, dtype)
        for budget, (tokens, stop) in budgets.items():
            with progress_bar(console, f"in-process {spec.label} {budget}", len(prompts)) as advance:
                began = time.perf_counter()
                generations = generate(model, tokenizer, prompts, tokens, batch_size, progress=advance, stop=stop)
                seconds = time.perf_counter() - began
            answers = [g.text for g in generations]
            new_tokens = sum(g.new_tokens for g in generations) / len(generations)
            results.append(result("inprocess", spec.label, budget, seconds, len(prompts), new_tokens, answers))
        del model
    return results


def run_engine(
    engine: str,
    specs: list[Any],
    config: Any,
    workspace: Any,
    prompts: Prompts,
    budgets: dict[str, Any],
    console: Any,
) -> tuple[list[dict[str, Any]], float]:
    from tuneloop.chat_client import chat_generate
    from tuneloop.serve.offline import engine_endpoints, eval_concurrency

    concurrency = eval_concurrency(config, engine)
    results = []
    console.print(f"starting {engine} (GGUF conversion when not cached, server start)")
    began = time.perf_counter()
    with engine_endpoints(specs, config, workspace, engine) as endpoints:
        started = time.perf_counter() - began
        for spec in specs:
            for budget, (tokens, stop) in budgets.items():
                with progress_bar(console, f"{engine} {spec.label} {budget}", len(prompts)) as advance:
                    began = time.perf_counter()
                    answers = chat_generate(
                        endpoints[spec.label], prompts, tokens, stop=stop, concurrency=concurrency, progress=advance
                    )
                    seconds = time.perf_counter() - began
                new_tokens = sum(a.new_tokens for a in answers) / len(answers)
                results.append(
                    result(engine, spec.label, budget, seconds, len(prompts), new_tokens, [a.text for a in answers])
                )
    return results, started


def result(
    engine: str, model: str, budget: str, seconds: float, rows: int, new_tokens: float, answers: list[str]
) -> dict[str, Any]:
    return {"engine": engine, "model": model, "budget": budget, "seconds": seconds, "rows_per_s": rows / seconds,
            "mean_new_tokens": new_tokens, "answers": answers}  # fmt: skip


@contextmanager
def progress_bar(console: Any, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over `total` rows; yields `advance(done)`."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def print_results(
    results: list[dict[str, Any]], starts: dict[str, float], console: Any, args: argparse.Namespace, precision: str
) -> None:
    from rich.table import Table

    from tuneloop.evaluate.parity import parity

    reference = {(r["model"], r["budget"]): r for r in results if r["engine"] == "inprocess"}
    table = Table(title=f"Evaluation generation, SmolLM2-135M + {args.adapter} LoRA, {precision}, {args.rows} rows")
    for column in ("generator", "model", "budget", "rows/s", "seconds", "mean new tokens", "vs in-process",
                   "answers equal to in-process"):  # fmt: skip
        table.add_column(column)
    differences = []
    for r in results:
        base = reference[(r["model"], r["budget"])]
        same = parity(base["answers"], r["answers"])
        if r["engine"] != "inprocess" and same["differences"]:
            differences.append((r["engine"], r["model"], r["budget"], same["differences"][0]))
        table.add_row(
            r["engine"], r["model"], r["budget"], f"{r['rows_per_s']:.2f}", f"{r['seconds']:.1f}",
            f"{r['mean_new_tokens']:.1f}", f"{r['rows_per_s'] / base['rows_per_s']:.2f}x",
            f"{same['equal']}/{same['rows']}",
        )  # fmt: skip
    console.print(table)
    for engine, seconds in starts.items():
        console.print(f"{engine} start-up (GGUF conversion when not cached, server start): {seconds:.0f} s")
    for engine, model, budget, first in differences:
        console.print(f"first difference, {engine} {model} {budget}: row {first['row']}: in-process "
                      f"{first['reference'][:80]!r} vs {first['engine'][:80]!r}")  # fmt: skip


if __name__ == "__main__":
    main()
