"""Batch collators for prepared datasets: padded rows, or packed rows with per-row position ids.

Padding is masked by position: pad positions get label -100 and attention 0 whatever the pad token id is (it may
equal EOS, whose real occurrences keep their labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneloop.data.render import IGNORE_INDEX


def collate_padded(
    rows: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Right-pad `input_ids`/`labels` to the longest row; returns torch tensors with an attention mask."""
    import torch

    longest = max(len(row["input_ids"]) for row in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        size = len(row["input_ids"])
        input_ids[index, :size] = torch.tensor(row["input_ids"])
        labels[index, :size] = torch.tensor(row["labels"])
        attention_mask[index, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(rows: Sequence[dict[str, Any]], pad_token_id: int, length: int | None = None) -> dict[str, Any]:
    """Packed rows: `position_ids` restart per original row and no attention_mask is returned, which makes
    Transformers build a block-diagonal mask (pass `use_cache=False`). Padding (to the longest row, or to `length`)
    forms its own block at the end."""
    import torch

    batch = collate_padded(rows, pad_token_id, pad_to_multiple_of=length)
    del batch["attention_mask"]
    longest = batch["input_ids"].shape[1]
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        size = len(row["position_ids"])
        position_ids[index, :size] = torch.tensor(row["position_ids"])
        position_ids[index, size:] = torch.arange(longest - size)
    batch["position_ids"] = position_ids
    return batch
