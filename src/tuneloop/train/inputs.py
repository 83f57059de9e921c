"""The prepared dataset as training inputs: HF datasets over the parquet splits and a collator that counts tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.data.collate import collate_packed, collate_padded


@dataclass
class TokenCounter:
    """Real (non-pad) tokens seen by this process; read by the progress and tracking callbacks."""

    tokens: int = 0


class CountingCollator:
    """Packed samples padded to the packing length, so every training batch has one shape (a compiled model then
    compiles once); other rows padded per batch."""

    def __init__(self, packed: bool, pad_token_id: int, counter: TokenCounter, packing_length: int | None = None):
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.counter = counter
        self.packing_length = packing_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        self.counter.tokens += sum(len(row["input_ids"]) for row in rows)
        if self.packed and "position_ids" in rows[0]:
            return collate_packed(rows, self.pad_token_id, self.packing_length)
        return collate_padded(rows, self.pad_token_id)


def load_splits(prepared: PreparedDataset) -> tuple[Any, Any | None]:
    from datasets import Dataset

    def split(name: str) -> Any:
        return Dataset.from_parquet([str(path) for path in prepared.parquet_files(name)])  # shards, in row order

    train = split("train")
    val = split("val") if prepared.has_validation else None
    return train, val
