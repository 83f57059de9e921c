"""Writing a split of the prepared dataset as parquet shards of `data.shard_rows` rows, packed or not.

Rows arrive as pyarrow tables in dataset order and are buffered until a shard is full, so at most one shard of rows
is in memory. With packing, each shard's rows are packed on their own (best-fit-decreasing, `pack.bin_rows`) with
numpy gathers instead of per-token Python lists; a dataset of one shard packs exactly as `pack.pack` would.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tuneloop.data.pack import bin_rows
from tuneloop.data.render import IGNORE_INDEX
from tuneloop.workspace import DatasetPaths

ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("source", pa.string()),
        ("row", pa.int64()),
    ]
)
PACKED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lengths", pa.list_(pa.int32())),
    ]
)


class ShardWriter:
    """Writes `total_rows` rows of `split` in shards of `shard_rows`; `packing_length` packs each shard's rows."""

    def __init__(
        self, out: DatasetPaths, split: str, total_rows: int, shard_rows: int, packing_length: int | None = None
    ) -> None:
        self.out = out
        self.split = split
        self.shard_rows = shard_rows
        self.count = max(1, math.ceil(total_rows / shard_rows))
        self.packing_length = packing_length
        self.files: list[str] = []
        self.samples = 0  # rows written, or packed samples
        self.packed_tokens = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def add(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        self._buffer.append(rows)
        self._buffered += rows.num_rows
        while self._buffered >= self.shard_rows:
            table = pa.concat_tables(self._buffer).combine_chunks()
            self._write(table.slice(0, self.shard_rows))
            rest = table.slice(self.shard_rows)
            self._buffer, self._buffered = [rest], rest.num_rows

    def close(self) -> list[str]:
        if self._buffered or not self.files:
            table = pa.concat_tables(self._buffer) if self._buffer else ROW_SCHEMA.empty_table()
            self._write(table.combine_chunks())
        self._buffer, self._buffered = [], 0
        return self.files

    @property
    def efficiency(self) -> float:
        """Share of the packed token slots that hold real tokens."""
        return (
            self.packed_tokens / (self.samples * self.packing_length) if self.samples and self.packing_length else 0.0
        )

    def _write(self, rows: pa.Table) -> None:
        table = rows.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
        if self.packing_length is not None:
            table = pack_table(table, self.packing_length)
            self.packed_tokens += int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
        path = self.out.parquet_shard(self.split, len(self.files), self.count)
        pq.write_table(table, path)
        self.files.append(path.name)
        self.samples += table.num_rows


def pack_table(rows: pa.Table, packing_length: int) -> pa.Table:
    """Rows (input_ids, labels) packed into samples of at most `packing_length` tokens, as `pack.pack` packs them:
    each row keeps its position ids from 0, its first label is ignored, `seq_lengths` lists the rows."""
    if rows.num_rows == 0:
        return PACKED_SCHEMA.empty_table()
    input_ids = rows["input_ids"].combine_chunks()
    labels = rows["labels"].combine_chunks()
    lengths = pc.list_value_length(input_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = bin_rows(lengths.tolist(), packing_length)
    order = np.fromiter((index for members in bins for index in members), dtype=np.int64, count=len(lengths))
    rows_per_bin = np.fromiter((len(members) for members in bins), dtype=np.int64, count=len(bins))
    ordered_lengths = lengths[order]
    flat_ids = pc.list_flatten(input_ids.take(order)).to_numpy(zero_copy_only=False).astype(np.int32)
    flat_labels = pc.list_flatten(labels.take(order)).to_numpy(zero_copy_only=False).astype(np.int32)
    row_starts = np.cumsum(ordered_lengths) - ordered_lengths
    flat_labels[row_starts[ordered_lengths > 0]] = IGNORE_INDEX  # no row is trained to predict its own first token
    positions = (np.arange(len(flat_ids), dtype=np.int64) - np.repeat(row_starts, ordered_lengths)).astype(np.int32)
    bin_row_offsets = np.r_[0, np.cumsum(rows_per_bin)].astype(np.int64)
    token_offsets = np.r_[0, np.cumsum(ordered_lengths)][bin_row_offsets].astype(np.int32)

    def lists(values: np.ndarray, offsets: np.ndarray) -> Any:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))

    return pa.Table.from_arrays(
        [
            lists(flat_ids, token_offsets),
            lists(flat_labels, token_offsets),
            lists(positions, token_offsets),
            lists(ordered_lengths.astype(np.int32), bin_row_offsets.astype(np.int32)),
        ],
        schema=PACKED_SCHEMA,
    )
