"""Do tuneloop's defaults reach the brief's task accuracy (> 85%)? `tuneloop run` with no `train` section at all on
2,000-row classification tasks from ../shared/data, accuracy on held-out test rows, with the wall time.

- SST-2: the first 2,000 train sentences (positive/negative); test: all 872 dev sentences.
- AG News: the first 2,000 rows of the 7,600-row file (World/Sports/Business/Technology, title + description);
  test: its last 760 rows (disjoint). Only the test file is available (PROVENANCE.md); the split is deterministic.

Each task runs the whole loop as a user would (`tuneloop run -c CONFIG --json`: prepare, train with defaults,
evaluate tuned and base on the test rows) in a fresh workspace; the configs are written to a temporary folder,
the data is read in place (the AG News rows are split into temporary CSV files, never into the repository).

    .venv/bin/python benchmarks/train_quality.py [--tasks sst2,ag_news] [--train-rows 2000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2_INSTRUCTION = "Is the sentiment of this sentence positive or negative? Answer with one word."
AG_NEWS_INSTRUCTION = "What is this news article about? Answer with one word: World, Sports, Business or Technology."
AG_NEWS_LABELS = {"1": "World", "2": "Sports", "3": "Business", "4": "Technology"}
AG_NEWS_TEST_ROWS = 760


def sst2_config(train_rows: int, folder: Path) -> dict[str, Any]:
    def source(path: Path, input_column: str) -> dict[str, Any]:
        return {
            "path": str(path),
            "format": "alpaca",
            "columns": {"input": input_column, "output": "label"},
            "defaults": {"instruction": SST2_INSTRUCTION},
            "value_map": {"output": {"0": "negative", "1": "positive"}},
        }

    train = source(SHARED / "sst2" / "train.tsv", "sentence") | {"limit": train_rows}
    return task_config("sst2", train, source(SHARED / "sst2" / "dev.tsv", "content"), ["positive", "negative"])


def ag_news_config(train_rows: int, folder: Path) -> dict[str, Any]:
    with (SHARED / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as handle:
        rows = [
            {"text": f"{row['title']}. {row['description']}", "label": AG_NEWS_LABELS[row["label"]]}
            for row in csv.DictReader(handle)
        ]
    if train_rows + AG_NEWS_TEST_ROWS > len(rows):
        raise SystemExit(f"AG News has {len(rows)} rows: at most {len(rows) - AG_NEWS_TEST_ROWS} for training")
    for name, part in (("train", rows[:train_rows]), ("test", rows[-AG_NEWS_TEST_ROWS:])):
        with (folder / f"ag_news_{name}.csv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)

    def source(name: str) -> dict[str, Any]:
        return {
            "path": str(folder / f"ag_news_{name}.csv"),
            "format": "alpaca",
            "columns": {"input": "text", "output": "label"},
            "defaults": {"instruction": AG_NEWS_INSTRUCTION},
        }

    return task_config("ag_news", source("train"), source("test"), list(AG_NEWS_LABELS.values()))


def task_config(name: str, train: dict[str, Any], test: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """No `train` section: every training setting is tuneloop's default."""
    return {
        "project": {"name": f"quality-{name}"},
        "model": {"base": "smollm2-135m-instruct"},
        "data": {"sources": [train]},
        "eval": {
            "data": test,
            "metrics": ["accuracy", "exact_match"],
            "labels": labels,
            "max_new_tokens": 8,
            "batch_size": 16,
        },
    }


TASKS = {"sst2": sst2_config, "ag_news": ag_news_config}


def run_task(name: str, train_rows: int, folder: Path) -> dict[str, Any]:
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump(TASKS[name](train_rows, folder)))
    env = dict(os.environ, TUNELOOP_HOME=str(folder / f"ws-{name}"))
    tuneloop = Path(sys.executable).parent / "tuneloop"
    began = time.perf_counter()
    completed = subprocess.run(
        [str(tuneloop), "run", "-c", str(config), "--json"], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - began
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name}: tuneloop run failed")
    result = json.loads(completed.stdout)
    training = result["training"]
    return {
        "task": name,
        "train_rows": result["data"]["train_rows"],
        "val_rows": result["data"]["val_rows"],
        "steps": training["steps"],
        "tokens_per_second": training["tokens_per_second"],
        "precision": training["precision"],
        "metrics": result["metrics"],
        "step_seconds": result["step_seconds"],
        "wall_seconds": round(wall, 1),
    }


def accuracy(metrics: dict[str, Any], model: str) -> float | None:
    """`metrics` as `tuneloop run --json` prints it: per model, `tuned` and `base`."""
    value = metrics.get(model, {}).get("accuracy")
    return float(value) if value is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,ag_news")
    parser.add_argument("--train-rows", type=int, default=2000)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from tuneloop.device import cpu_description

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks.split(","):
            results.append(run_task(name, args.train_rows, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr)
    console = Console(width=200)
    console.print(f"CPU: {cpu_description()}")
    table = Table(title="tuneloop defaults (no train section), `tuneloop run` on 2,000-row classification tasks")
    for column in ("task", "train / val rows", "steps", "precision", "tokens/s", "base accuracy", "tuned accuracy",
                   "train s", "eval s", "tuneloop run s"):  # fmt: skip
        table.add_column(column)
    for result in results:
        tuned, base = accuracy(result["metrics"], "tuned"), accuracy(result["metrics"], "base")
        table.add_row(
            result["task"],
            f"{result['train_rows']} / {result['val_rows']}",
            str(result["steps"]),
            result["precision"],
            f"{result['tokens_per_second']:,.0f}",
            f"{base:.3f}" if base is not None else "-",
            f"{tuned:.3f}" if tuned is not None else "-",
            f"{result['step_seconds'].get('train', 0):.0f}",
            f"{result['step_seconds'].get('eval', 0):.0f}",
            f"{result['wall_seconds']:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
