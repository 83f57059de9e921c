"""Throughput of `tuneloop data prepare` against a plain `datasets.map(tokenize)` baseline, in one run.

Data: SST-2 train from ../shared/data/sst2 (label<TAB>sentence) as alpaca instruction rows; SmolLM2-135M-Instruct's
tokenizer and chat template. The baseline is what people write by hand: load the TSV with `datasets`, map a batched
function that renders each row with `apply_chat_template` and tokenizes it (no quality filters, no loss mask, no
split, no report). tuneloop is measured with every filter on (its default) and with the filters off.

    .venv/bin/python benchmarks/data_prepare.py [--rows 20000]

`--scale ROWS` measures instead what OpenOrca-size sources cost: a synthetic OpenOrca-like JSONL source of ROWS rows
(`system_prompt`/`question`/`response` with OpenOrca's lengths, English words drawn by their SST-2 frequencies) is
generated into a temp dir and prepared with every filter on, once per `--num-proc` value, each in a child process.
It prints the CPU (model, ISA), rows/s and the peak resident memory of the whole process tree (main + workers,
sampled every 0.2 s; shared pages are counted once per process, so this is an upper bound) against `--rss-bound-gib`.

    .venv/bin/python benchmarks/data_prepare.py --scale 2000000 --num-proc 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.data.workers import available_cores
from tuneloop.models import load_tokenizer, resolve_base
from tuneloop.workspace import Workspace

INSTRUCTION = "Is the sentiment of this sentence positive or negative?"
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def subset(rows: int, out: Path) -> Path:
    with SST2.open(encoding="utf-8") as source, out.open("w", encoding="utf-8") as target:
        target.write(source.readline())
        for index, line in enumerate(source):
            if index >= rows:
                break
            target.write(line)
    return out


def run_tuneloop(tsv: Path, workspace: Workspace, filters_on: bool, config_dir: Path) -> tuple[float, dict]:
    config = {
        "data": {
            "sources": [
                {
                    "path": str(tsv),
                    "format": "alpaca",
                    "columns": {"input": "sentence", "output": "label"},
                    "defaults": {"instruction": INSTRUCTION},
                    "value_map": {"output": {"0": "negative", "1": "positive"}},
                }
            ],
            "max_seq_len": 256,
            "filters": {}
            if filters_on
            else {"exact_duplicates": False, "near_duplicates": {"enabled": False}, "toxicity": {"enabled": False}},
        }
    }
    path = config_dir / f"bench-{filters_on}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    prepared = prepare_dataset(load_config(path), workspace, force=True, console=Console(stderr=True, quiet=True))
    return time.perf_counter() - started, prepared.summary()


def run_baseline(tsv: Path, tokenizer: object) -> float:
    from datasets import disable_caching, load_dataset

    disable_caching()
    started = time.perf_counter()
    dataset = load_dataset("csv", data_files=str(tsv), delimiter="\t", quoting=csv.QUOTE_NONE, split="train")
    labels = {0: "negative", 1: "positive"}

    def tokenize(batch: dict) -> dict:
        texts = [
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": f"{INSTRUCTION}\n\n{sentence}"},
                    {"role": "assistant", "content": labels[int(label)]},
                ],
                tokenize=False,
            )
            for sentence, label in zip(batch["sentence"], batch["label"], strict=True)
        ]
        return tokenizer(texts, add_special_tokens=False)

    dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    return time.perf_counter() - started


def cpu_line() -> str:
    """CPU model, cores given to this process and the vector ISA extensions that matter for numpy/tokenizers."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [
        flag
        for flag in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")
        if flag in flags
    ]
    return f"{model}, {available_cores()} cores, {platform.machine()} {' '.join(isa)}"


SYSTEM_PROMPTS = [  # OpenOrca's system messages are a few fixed instructions (some rows have none)
    "",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that helps people find information. Provide a detailed answer so user don't need to "
    "search outside to understand the answer.",
    "Explain how you used the definition to come up with the answer.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You should describe the task and explain your answer. While answering a multiple choice question, first output "
    "the correct answer(s). Then explain why other answers are wrong.",
    "User will you give you a task with some instruction. Your job is follow the instructions as faithfully as you "
    "can. While answering think step-by-step and justify your answer.",
]


def openorca_like(rows: int, out: Path, seed: int = 0) -> Path:
    """A JSONL source shaped like OpenOrca: questions ~750 characters, responses ~550 (log-normal, long tails)."""
    import numpy as np

    words: dict[str, int] = {}
    with SST2.open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            for word in line.split("\t", 1)[-1].split():
                words[word] = words.get(word, 0) + 1
    vocabulary = np.array(list(words), dtype=object)
    probabilities = np.array(list(words.values()), dtype=np.float64)
    probabilities /= probabilities.sum()
    generator = np.random.default_rng(seed)

    def texts(count: int, mean_words: float) -> list[str]:
        lengths = np.maximum(1, generator.lognormal(np.log(mean_words) - 0.5, 1.0, count).astype(np.int64))
        drawn = vocabulary[generator.choice(len(vocabulary), size=int(lengths.sum()), p=probabilities)]
        ends = np.cumsum(lengths)
        return [" ".join(drawn[end - size : end]) + " ." for size, end in zip(lengths, ends, strict=True)]

    with out.open("w", encoding="utf-8") as handle:
        for start in range(0, rows, 20_000):
            count = min(20_000, rows - start)
            questions, responses = texts(count, 140), texts(count, 105)
            systems = generator.integers(0, len(SYSTEM_PROMPTS), count)
            for offset in range(count):
                row = {
                    "id": f"synthetic.{start + offset}",
                    "system_prompt": SYSTEM_PROMPTS[systems[offset]],
                    "question": questions[offset],
                    "response": responses[offset],
                }
                handle.write(json.dumps(row) + "\n")
    return out


_CHILD = """
import json, sys, time
from pathlib import Path
from rich.console import Console
from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.data.workers import available_cores
from tuneloop.workspace import Workspace
config = load_config(sys.argv[1])
started = time.perf_counter()
prepared = prepare_dataset(config, Workspace(Path(sys.argv[2])), force=True, console=Console(stderr=True, quiet=True))
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "summary": prepared.summary(), "shards": prepared.manifest.shards}))
"""


def run_scale(source: Path, rows: int, num_proc: int, tmp: Path) -> dict:
    """Prepare `source` in a child process with `num_proc` workers; wall time and the process tree's peak RSS."""
    import psutil

    config = {
        "model": {"base": "smollm2-135m-instruct"},
        "data": {
            "sources": [
                {
                    "path": str(source),
                    "format": "alpaca",
                    "columns": {"instruction": "question", "output": "response", "system": "system_prompt"},
                }
            ],
            "max_seq_len": 2048,
            "num_proc": num_proc,
        },
    }
    path = tmp / f"scale-{num_proc}.yaml"
    path.write_text(yaml.safe_dump(config))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(tmp / "ws")], stdout=subprocess.PIPE, text=True
    )
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(process.memory_info().rss for process in tree if process.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise SystemExit(f"prepare with num_proc={num_proc} failed (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    return {"num_proc": num_proc, "rows": rows, "peak_rss": peak, **result}


def scale_main(rows: int, procs: list[int], bound_gib: float, as_json: bool) -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        source = openorca_like(rows, tmp_path / "openorca_like.jsonl")
        console.print(
            f"generated {rows:,} OpenOrca-like rows ({source.stat().st_size / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - started:.0f} s"
        )
        load_tokenizer(resolve_base("smollm2-135m-instruct", Workspace(tmp_path / "ws")))  # warm the cache
        results = [run_scale(source, rows, num_proc, tmp_path) for num_proc in procs]
    bound = bound_gib * 2**30
    if as_json:
        print(json.dumps({"cpu": cpu_line(), "bound_gib": bound_gib, "results": results}))
    else:
        console.print(f"CPU: {cpu_line()}")
        table = Table(title=f"data prepare, {rows:,} OpenOrca-like rows, all filters, SmolLM2 tokenizer")
        for column in (
            "num_proc",
            "seconds",
            "rows/s",
            "speed-up",
            "peak RSS (tree)",
            f"< {bound_gib:g} GiB",
            "kept",
            "shards",
        ):
            table.add_column(column, justify="right")
        for result in results:
            summary = result["summary"]
            table.add_row(
                str(result["num_proc"]),
                f"{result['seconds']:.0f}",
                f"{rows / result['seconds']:,.0f}",
                f"{results[0]['seconds'] / result['seconds']:.2f}x",
                f"{result['peak_rss'] / 2**30:.2f} GiB",
                "yes" if result["peak_rss"] < bound else "NO",
                f"{summary['train_rows'] + summary['val_rows']:,}",
                str(len(result["shards"].get("train", [])) + len(result["shards"].get("val", []))),
            )
        console.print(table)
        console.print(f"filters removed: { {k: v for k, v in results[0]['summary']['filtered'].items() if v} }")
    if any(result["peak_rss"] >= bound for result in results):
        raise SystemExit(f"peak RSS over the {bound_gib:g} GiB bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale", type=int, metavar="ROWS", help="OpenOrca-like synthetic source of ROWS rows")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="with --scale: worker counts to run")
    parser.add_argument("--rss-bound-gib", type=float, default=4.0, help="with --scale: the peak RSS bound checked")
    args = parser.parse_args()
    if args.scale:
        scale_main(args.scale, args.num_proc, args.rss_bound_gib, args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        workspace = Workspace(tmp_path / "ws")
        tokenizer = load_tokenizer(resolve_base("smollm2-135m-instruct", workspace))  # warm the tokenizer cache
        tsv = subset(args.rows, tmp_path / "sst2.tsv")
        baseline = run_baseline(tsv, tokenizer)
        full, summary = run_tuneloop(tsv, workspace, True, tmp_path)
        bare, _ = run_tuneloop(tsv, workspace, False, tmp_path)
    rows = args.rows
    results = [
        ("datasets.map(apply_chat_template + tokenize) [baseline]", baseline),
        ("tuneloop data prepare, filters off", bare),
        ("tuneloop data prepare, all filters (default)", full),
    ]
    if args.json:
        print(json.dumps({name: {"seconds": s, "rows_per_s": rows / s} for name, s in results} | {"summary": summary}))
        return
    table = Table(title=f"data prepare on {rows} SST-2 rows (SmolLM2 tokenizer)")
    table.add_column("pipeline")
    table.add_column("seconds", justify="right")
    table.add_column("rows/s", justify="right")
    table.add_column("vs baseline", justify="right")
    for name, seconds in results:
        table.add_row(name, f"{seconds:.2f}", f"{rows / seconds:,.0f}", f"{baseline / seconds:.2f}x")
    console = Console()
    console.print(table)
    console.print(
        f"filters removed: { {k: v for k, v in summary['filtered'].items() if v} }; "
        f"kept {summary['train_rows'] + summary['val_rows']} of {summary['rows_read']}"
    )


if __name__ == "__main__":
    main()
