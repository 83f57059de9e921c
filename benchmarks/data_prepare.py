"""Throughput of `tuneloop data prepare` against a plain `datasets.map(tokenize)` baseline, in one run.

Data: SST-2 train from ../shared/data/sst2 (label<TAB>sentence) as alpaca instruction rows; SmolLM2-135M-Instruct's
tokenizer and chat template. The baseline is what people write by hand: load the TSV with `datasets`, map a batched
function that renders each row with `apply_chat_template` and tokenizes it (no quality filters, no loss mask, no
split, no report). tuneloop is measured with every filter on (its default) and with the filters off.

    .venv/bin/python benchmarks/data_prepare.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tuneloop.config_file import load_config
from tuneloop.data.prepare import prepare_dataset
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
