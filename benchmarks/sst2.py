"""SST-2 from ../shared/data (never copied into the repo) as a tuneloop data source: the rows the benchmarks share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN_TSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
INSTRUCTION = "Is the sentiment of this sentence positive or negative? Answer with one word."


def source(rows: int, instruction: str = INSTRUCTION) -> dict[str, Any]:
    """`data.sources[i]`: each sentence as an alpaca row whose answer is the label's word."""
    return {
        "path": str(TRAIN_TSV),
        "format": "alpaca",
        "columns": {"input": "sentence", "output": "label"},
        "defaults": {"instruction": instruction},
        "value_map": {"output": {"0": "negative", "1": "positive"}},
        "limit": rows,
    }
