"""Packing tokenized rows into fixed-size samples without cross-contamination.

Rows are placed by best-fit-decreasing (as TRL's `bfd` packing). Inside a packed sample every row keeps its own
`position_ids` starting at 0; Transformers turns restarting position ids into a block-diagonal attention mask
(when no attention_mask is passed and the cache is off), so no token attends to another row. The first token of each
row gets label -100, so no row is trained to predict the start of the next one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tuneloop.data.render import IGNORE_INDEX


@dataclass
class PackedSample:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lengths: list[int] = field(default_factory=list)

    def add(self, input_ids: list[int], labels: list[int]) -> None:
        self.input_ids += input_ids
        self.labels += [IGNORE_INDEX, *labels[1:]]
        self.position_ids += list(range(len(input_ids)))
        self.seq_lengths.append(len(input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


SHORTEST_PACKING_LENGTH = 256


def packing_length(setting: int | str, longest_row: int, max_seq_len: int) -> int:
    """`data.packing_length` resolved: `auto` is the smallest power of two >= 256 that holds the longest row, at most
    `max_seq_len` (a packed sample's attention is O(length^2) on a CPU, so short rows pack into short samples)."""
    if isinstance(setting, int):
        return max(setting, longest_row)
    length = SHORTEST_PACKING_LENGTH
    while length < longest_row:
        length *= 2
    return max(min(length, max_seq_len), longest_row)


def pack(rows: list[tuple[list[int], list[int]]], max_len: int) -> list[PackedSample]:
    """Best-fit-decreasing bin packing of (input_ids, labels) rows into samples of at most `max_len` tokens."""
    bins: list[PackedSample] = []
    for members in bin_rows([len(ids) for ids, _ in rows], max_len):
        bins.append(PackedSample())
        for index in members:
            bins[-1].add(*rows[index])
    return bins


def bin_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing on row lengths alone: the row indices of each packed sample, in the order they are placed
    (`pack` builds the samples from them; the sharded writer packs numpy arrays with the same assignment)."""
    too_long = [size for size in lengths if size > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} row(s) exceed max_len={max_len}; truncate or filter them first")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    # (remaining capacity, bin index), kept sorted so the tightest bin that fits is found by bisection.
    free: list[tuple[int, int]] = []
    for index in order:
        size = lengths[index]
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([])
            bin_index, remaining = len(bins) - 1, max_len
        else:
            remaining, bin_index = free.pop(slot)
        bins[bin_index].append(index)
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, bin_index))
    return bins


def packing_efficiency(samples: list[PackedSample], max_len: int) -> float:
    """Share of the token slots that hold real tokens."""
    return sum(len(sample) for sample in samples) / (len(samples) * max_len) if samples else 0.0
