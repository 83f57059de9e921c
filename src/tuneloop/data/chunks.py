"""One chunk of source records through normalisation, the per-row filters and tokenization, in a worker process.

A worker turns the records of one chunk (one source, one format) into samples, and for each sample computes what
the order-dependent filters in the main process need (the exact-duplicate digest, the toxicity score) and what
tokenization decided (kept, or the reason it is dropped, with token counts). The bulky part (token ids, the
conversation as JSON, the row as read, the normalised text for near-duplicate detection) goes straight to a parquet
spill file of the chunk; only small per-row arrays travel back to the main process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.config import DataConfig
from tuneloop.data.filters import normalised_text
from tuneloop.data.formats import RowError, Sample, normalise, prepare_record
from tuneloop.data.render import ChatRenderer, RenderedText, truncate
from tuneloop.data.sources import RawRecord

CHUNK_ROWS = 2048  # records per chunk: one tokenizer batch, small enough to keep several chunks in flight

# Why tokenization dropped a sample (index into TOKENIZE_REASONS; 0 = kept).
KEPT, RENDER_ERROR, TOO_SHORT, TOO_LONG, NO_TRAINABLE = range(5)
TOKENIZE_REASONS = ("", "render_error", "too_short", "too_long", "no_trainable_tokens")


@dataclass
class ChunkTask:
    index: int
    source_index: int
    fmt: str
    records: list[RawRecord]
    spill: Path


@dataclass
class ChunkResult:
    """What the main process needs of a chunk; sample `i` is the chunk's i-th record that normalised."""

    rows_read: int
    quarantine: list[tuple[str, dict[str, Any]]]  # ("read" | "normalise", entry) for records that are no sample
    record_positions: list[int]  # the record of each sample, by position in the chunk
    digests: np.ndarray | None  # uint64 digest of the normalised text (exact duplicates), when that filter is on
    toxicity: np.ndarray | None  # float32 offensive-language probability, when that filter is on
    reasons: np.ndarray  # uint8 TOKENIZE_REASONS index
    lengths: np.ndarray  # int32 tokens (after truncation when kept; before, when dropped for length)
    trainable: np.ndarray  # int32 tokens that carry loss
    truncated: np.ndarray  # bool
    render_errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # sample -> (reason, detail)

    @property
    def samples(self) -> int:
        return len(self.record_positions)


class _WorkerState:
    data: DataConfig
    tokenizer: Any


_STATE = _WorkerState()


def init_worker(data: DataConfig, tokenizer: Any) -> None:
    """Pool initializer (and the in-process set-up): the config and tokenizer every chunk uses."""
    _STATE.data = data
    _STATE.tokenizer = tokenizer


def quarantine_entry(record: RawRecord, reason: str, detail: str) -> dict[str, Any]:
    """A quarantine line for a record that never became a sample."""
    return {
        "source": record.source,
        "line": record.line,
        "row": record.row,
        "reason": reason,
        "detail": detail,
        "data": record.data if record.error is None else None,
        "raw": record.raw_text,
    }


def process_chunk(task: ChunkTask) -> ChunkResult:
    data = _STATE.data
    source_config = data.sources[task.source_index]
    quarantine: list[tuple[str, dict[str, Any]]] = []
    samples: list[Sample] = []
    positions: list[int] = []
    for position, record in enumerate(task.records):
        if record.error is not None:
            quarantine.append(("read", quarantine_entry(record, "malformed", record.error)))
            continue
        try:
            row = prepare_record(record.data, source_config)
        except RowError as error:
            quarantine.append(("read", quarantine_entry(record, error.reason, error.detail)))
            continue
        try:
            messages, kind = normalise(row, task.fmt, source_config)
        except RowError as error:
            quarantine.append(("normalise", quarantine_entry(record, error.reason, error.detail)))
            continue
        samples.append(Sample(messages, kind, record.source, record.row, record.line, raw=record.data))
        positions.append(position)

    filters = data.filters
    texts = [normalised_text(sample) for sample in samples]
    digests = None
    if filters.exact_duplicates:
        digests = np.array(
            [int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") for text in texts],
            dtype=np.uint64,
        )
    toxicity = _toxicity(samples) if filters.toxicity.enabled else None
    result = ChunkResult(
        rows_read=len(task.records),
        quarantine=quarantine,
        record_positions=positions,
        digests=digests,
        toxicity=toxicity,
        reasons=np.zeros(len(samples), dtype=np.uint8),
        lengths=np.zeros(len(samples), dtype=np.int32),
        trainable=np.zeros(len(samples), dtype=np.int32),
        truncated=np.zeros(len(samples), dtype=bool),
    )
    token_ids, token_labels = _tokenize(samples, result)
    _write_spill(task.spill, samples, texts if filters.near_duplicates.enabled else None, token_ids, token_labels)
    return result


def _toxicity(samples: list[Sample]) -> np.ndarray:
    """The highest offensive-language probability of each sample's scored turns (as `filters.drop_toxic`)."""
    from profanity_check import predict_prob

    scope = _STATE.data.filters.toxicity.scope
    owners: list[int] = []
    texts: list[str] = []
    for position, sample in enumerate(samples):
        for message in sample.messages:
            if scope == "all" or message.role in ("assistant", "text"):
                owners.append(position)
                texts.append(message.content)
    scores = np.zeros(len(samples), dtype=np.float64)
    if texts:
        for owner, probability in zip(owners, predict_prob(texts), strict=True):
            scores[owner] = max(scores[owner], float(probability))
    return scores


def _tokenize(samples: list[Sample], result: ChunkResult) -> tuple[list[list[int]], list[list[int]]]:
    """Render and tokenize the chunk's samples; fills the result's token arrays and reasons; the kept token ids."""
    data = _STATE.data
    filters = data.filters
    max_tokens = filters.max_tokens or (None if data.truncation else data.max_seq_len)
    # A fresh renderer per chunk: its template fast path is verified on each chunk's first rows, so what a row
    # renders to never depends on which worker saw which rows first.
    renderer = ChatRenderer(_STATE.tokenizer, data.train_on)
    rendered_texts: list[tuple[int, RenderedText]] = []
    for position, sample in enumerate(samples):
        try:
            rendered_texts.append((position, renderer.render_text(sample)))
        except RowError as error:
            result.reasons[position] = RENDER_ERROR
            result.render_errors[position] = (error.reason, error.detail)
    token_ids: list[list[int]] = [[] for _ in samples]
    token_labels: list[list[int]] = [[] for _ in samples]
    encoded = renderer.encode([text for _, text in rendered_texts])
    for (position, _), rendered in zip(rendered_texts, encoded, strict=True):
        size = len(rendered.input_ids)
        result.lengths[position] = size
        if size < filters.min_tokens:
            result.reasons[position] = TOO_SHORT
            continue
        if max_tokens is not None and size > max_tokens:
            result.reasons[position] = TOO_LONG
            continue
        rendered = truncate(rendered, data.max_seq_len)
        result.lengths[position] = len(rendered.input_ids)
        result.truncated[position] = rendered.truncated
        result.trainable[position] = rendered.num_trainable
        if rendered.num_trainable == 0:
            result.reasons[position] = NO_TRAINABLE
            continue
        token_ids[position] = rendered.input_ids
        token_labels[position] = rendered.labels
    return token_ids, token_labels


def tokenize_detail(reason: int, length: int, data: DataConfig) -> str:
    """The quarantine detail of a length rejection (`render_error` details travel in `ChunkResult.render_errors`)."""
    filters = data.filters
    if reason == TOO_SHORT:
        return f"{length} tokens < min_tokens={filters.min_tokens}"
    if reason == TOO_LONG:
        return f"{length} tokens > {filters.max_tokens or data.max_seq_len}"
    return "no token carries loss (after truncation)"


SPILL_SCHEMA_FIELDS = ("text", "raw", "conversation", "input_ids", "labels", "source", "row")


def _write_spill(
    path: Path,
    samples: list[Sample],
    texts: list[str] | None,
    token_ids: list[list[int]],
    token_labels: list[list[int]],
) -> None:
    """The chunk's samples as parquet: everything the later passes read back, in sample order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [
        json.dumps(
            {
                "messages": [{"role": m.role, "content": m.content} for m in sample.messages],
                "kind": sample.kind,
                "source": sample.source,
                "line": sample.line,
                "row": sample.row,
            },
            ensure_ascii=False,
        )
        for sample in samples
    ]
    table = pa.table(
        {
            "text": pa.array(texts if texts is not None else [None] * len(samples), pa.string()),
            # The row as read: quarantine keeps it when a later stage (near-duplicates, length) drops the sample.
            "raw": pa.array([json.dumps(sample.raw, ensure_ascii=False, default=str) for sample in samples]),
            "conversation": pa.array(conversations, pa.string()),
            "input_ids": pa.array(token_ids, pa.list_(pa.int32())),
            "labels": pa.array(token_labels, pa.list_(pa.int32())),
            "source": pa.array([sample.source for sample in samples], pa.string()),
            "row": pa.array([sample.row for sample in samples], pa.int64()),
        }
    )
    pq.write_table(table, path, compression="zstd")
