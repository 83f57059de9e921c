"""The SFT dataset build, streamed: sources of millions of rows prepare in bounded memory, in worker processes.

Passes (scratch files under the staging folder's `_scratch/`, removed when done):

1. read + tokenize: sources are read record by record in chunks (`chunks.CHUNK_ROWS`); workers normalise, score
   toxicity, render and tokenize each chunk and spill it to parquet. The main process applies the order-dependent
   filters as results arrive in order: exact duplicates (a set of 8-byte digests), then toxicity.
2. near duplicates (`near_dup`): signatures in workers, LSH bands partitioned on disk, a greedy pass in row order.
3. split + write: the seeded split over the kept rows, then one pass over the spills writes `train.jsonl`/`val.jsonl`
   and the parquet shards (`shards.ShardWriter`, packing shard by shard).

Rows are dropped with the same precedence as before streaming: parse errors, duplicate, toxic, near-duplicate, then
render and length. Every decision depends on the rows' order only, never on which worker saw them, so `data.num_proc`
does not change the result. The quarantine is written stage by stage and concatenated in that order.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from tuneloop.data.chunks import (
    CHUNK_ROWS,
    KEPT,
    RENDER_ERROR,
    TOKENIZE_REASONS,
    ChunkResult,
    ChunkTask,
    init_worker,
    process_chunk,
    tokenize_detail,
)
from tuneloop.data.formats import RowError, detect_format, prepare_record
from tuneloop.data.near_dup import (
    BandIndex,
    NearDuplicate,
    SignatureTask,
    boilerplate,
    boilerplate_sample,
    init_signature_worker,
    sample_texts,
    sign_chunk,
)
from tuneloop.data.pack import packing_length
from tuneloop.data.preference import read_provenance
from tuneloop.data.shards import ShardWriter
from tuneloop.data.sources import RawRecord, read_records
from tuneloop.data.workers import ordered_map, resolve_num_proc
from tuneloop.errors import DataError
from tuneloop.workspace import DatasetPaths

if TYPE_CHECKING:
    from rich.progress import Progress

    from tuneloop.data.prepare import _Build

OK, DUPLICATE, TOXIC = 0, 1, 2
_DETECT_ROWS = 200  # rows a source's format is detected from


def build_sft(build: _Build, source_paths: list[Path], out: DatasetPaths) -> dict[str, Any]:
    """The SFT variant of `prepare._Build.run`: the manifest's fields; sets the build's report sample, token lengths
    and quarantine preview."""
    scratch = out.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _StreamedBuild(build, scratch).run(source_paths, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Quarantine:
    """Rejected rows, one scratch file per stage; `finish` concatenates them in stage order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handles: dict[str, Any] = {}
        self.filtered: Counter[str] = Counter()
        self.count = 0

    def add(self, stage: str, entry: dict[str, Any]) -> None:
        handle = self.handles.get(stage)
        if handle is None:
            handle = self.handles[stage] = (self.folder / f"quarantine-{stage}.jsonl").open("w", encoding="utf-8")
        handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.filtered[entry["reason"]] += 1
        self.count += 1

    def finish(self, path: Path, stages: list[str], preview_rows: int = 20) -> list[dict[str, Any]]:
        for handle in self.handles.values():
            handle.close()
        with path.open("wb") as target:
            for stage in stages:
                if stage in self.handles:
                    with (self.folder / f"quarantine-{stage}.jsonl").open("rb") as source:
                        shutil.copyfileobj(source, target)
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in itertools.islice(handle, preview_rows)]


class _Samples:
    """Per-sample facts kept in the main process as compact arrays (a few bytes per row)."""

    def __init__(self) -> None:
        self.status = array("B")
        self.reason = array("B")
        self.length = array("i")
        self.trainable = array("i")
        self.truncated = array("B")
        self.source = array("H")
        self.row = array("q")
        self.line = array("q")  # -1: the format has no lines

    def __len__(self) -> int:
        return len(self.status)

    def where(self, index: int, source_names: list[str]) -> str:
        source, line = source_names[self.source[index]], self.line[index]
        return f"{source}:{line}" if line >= 0 else f"{source}#row{self.row[index]}"


class _StreamedBuild:
    def __init__(self, build: _Build, scratch: Path) -> None:
        self.build = build
        self.data = build.data
        self.scratch = scratch
        self.num_proc = resolve_num_proc(self.data.num_proc)
        self.quarantine = _Quarantine(scratch)
        self.samples = _Samples()
        self.render_errors: dict[int, tuple[str, str]] = {}
        self.spills: list[tuple[Path, int, int]] = []  # (file, first sample, samples)
        self.source_names: list[str] = []

    def run(self, source_paths: list[Path], out: DatasetPaths) -> dict[str, Any]:
        build = self.build
        self.source_names = [str(path) for path in source_paths]
        with build._progress() as progress:
            sources_info = self._read_and_tokenize(source_paths, progress)
            near_duplicates = self._near_duplicates(progress)
            written = self._write(out, near_duplicates, progress)
        stages = [f"{stage}-{index}" for index in range(len(source_paths)) for stage in ("read", "normalise")]
        stages += ["duplicate", "toxic", "near_duplicate", "tokenize"]
        build.quarantine = self.quarantine.finish(out.quarantine, stages)  # the report's preview
        from tuneloop.data.prepare import FILTER_REASONS

        counts = written["counts"]
        return {
            "sources": sources_info,
            "counts": {
                "rows_read": sum(info["rows_read"] for info in sources_info),
                **counts,
                "quarantined": self.quarantine.count,
                "filtered": {reason: self.quarantine.filtered.get(reason, 0) for reason in FILTER_REASONS},
            },
            "tokens": written["tokens"],
            "packing": written["packing"],
            "tokenizer": {
                "class": type(build.tokenizer).__name__,
                "eos_token": build.tokenizer.eos_token,
                "eos_token_id": build.tokenizer.eos_token_id,
                "pad_token": build.tokenizer.pad_token,
                "pad_token_id": build.tokenizer.pad_token_id,
                "pad_equals_eos": build.tokenizer.pad_token_id == build.tokenizer.eos_token_id,
            },
            "train_on": self.data.train_on,
            "shards": written["shards"],
        }

    # -- pass 1: read, normalise, tokenize (workers); exact duplicates and toxicity (here, in order) ---------------
    def _read_and_tokenize(self, source_paths: list[Path], progress: Progress) -> list[dict[str, Any]]:
        formats: list[str] = []
        pending: deque[ChunkTask] = deque()
        task_id = progress.add_task("read + tokenize", total=None)

        def tasks() -> Iterator[ChunkTask]:
            index = 0
            for source_index, (source_config, path) in enumerate(zip(self.data.sources, source_paths, strict=True)):
                records = read_records(path, source_config.split, source_config.limit)
                head = list(itertools.islice(records, _DETECT_ROWS))
                fmt = source_config.format
                if fmt == "auto":
                    fmt = detect_format(_prepared_rows(head, source_config), str(path))
                    self.build.console.print(f"[cyan]{path.name}[/]: detected format [bold]{fmt}[/]")
                formats.append(fmt)
                stream = itertools.chain(head, records)
                while chunk := list(itertools.islice(stream, CHUNK_ROWS)):
                    task = ChunkTask(index, source_index, fmt, chunk, self.scratch / f"rows-{index:06d}.parquet")
                    pending.append(task)
                    index += 1
                    yield task

        rows_read = [0] * len(source_paths)
        rows_usable = [0] * len(source_paths)
        seen: dict[int, int] = {}  # exact-duplicate digest -> first sample with it
        for result in ordered_map(
            process_chunk, tasks(), self.num_proc, init_worker, (self.data, self.build.tokenizer)
        ):
            task = pending.popleft()
            rows_read[task.source_index] += result.rows_read
            rows_usable[task.source_index] += result.samples
            self._take(task, result, seen)
            progress.update(task_id, advance=result.rows_read)
        progress.update(task_id, total=sum(rows_read))
        return [
            {
                "path": str(path),
                "configured_path": source_config.path,
                "format": fmt,
                "rows_read": read,
                "rows_usable": usable,
                "provenance": read_provenance(path) if path.is_file() else None,
            }
            for source_config, path, fmt, read, usable in zip(
                self.data.sources, source_paths, formats, rows_read, rows_usable, strict=True
            )
        ]

    def _take(self, task: ChunkTask, result: ChunkResult, seen: dict[int, int]) -> None:
        """Record a chunk's samples and apply exact-duplicate and toxicity filtering in order."""
        for stage, entry in result.quarantine:
            self.quarantine.add(f"{stage}-{task.source_index}", entry)
        samples = self.samples
        first = len(samples)
        records = [task.records[position] for position in result.record_positions]
        samples.source.extend([task.source_index] * result.samples)
        samples.row.extend(record.row for record in records)
        samples.line.extend(-1 if record.line is None else record.line for record in records)
        samples.reason.extend(result.reasons.tolist())
        samples.length.extend(result.lengths.tolist())
        samples.trainable.extend(result.trainable.tolist())
        samples.truncated.extend(result.truncated.astype(np.uint8).tolist())
        for position, (reason, detail) in result.render_errors.items():
            self.render_errors[first + position] = (reason, detail)
        digests = result.digests.tolist() if result.digests is not None else None
        toxicity = self.data.filters.toxicity
        for position, record in enumerate(records):
            index = first + position
            status = OK
            if digests is not None:
                original = seen.setdefault(digests[position], index)
                if original != index:
                    status = DUPLICATE
                    detail = f"same text as {samples.where(original, self.source_names)}"
                    self.quarantine.add("duplicate", _sample_entry(record, "duplicate", detail))
            if status == OK and result.toxicity is not None and result.toxicity[position] >= toxicity.threshold:
                status = TOXIC
                detail = f"offensive-language probability {result.toxicity[position]:.2f}"
                self.quarantine.add("toxic", _sample_entry(record, "toxic", detail))
            samples.status.append(status)
        self.spills.append((task.spill, first, result.samples))

    # -- pass 2: near duplicates ------------------------------------------------------------------------------------
    def _checked(self) -> list[tuple[Path, np.ndarray]]:
        """Each spill with the positions of its samples that passed pass 1's filters."""
        status = np.frombuffer(self.samples.status, dtype=np.uint8)
        return [(path, np.flatnonzero(status[first : first + count] == OK)) for path, first, count in self.spills]

    def _near_duplicates(self, progress: Progress) -> dict[int, NearDuplicate]:
        """Near-duplicates by sample index -> the kept sample they match."""
        config = self.data.filters.near_duplicates
        if not config.enabled:
            return {}
        checked = self._checked()
        total = sum(len(positions) for _, positions in checked)
        if total == 0:
            return {}
        task_id = progress.add_task("filter near duplicates", total=total)
        common = boilerplate(sample_texts(checked, boilerplate_sample(total)), total, config.ngram)
        index = BandIndex(config, self.scratch / "near_dup")
        tasks = (SignatureTask(path, positions) for path, positions in checked if len(positions))
        for result in ordered_map(sign_chunk, tasks, self.num_proc, init_signature_worker, (config, common)):
            index.add(result)
            progress.update(task_id, advance=len(result.empty))
        found = index.resolve()
        # positions among the checked rows -> sample indices
        sample_of = np.concatenate(
            [first + positions for (_, positions), (_, first, _) in zip(checked, self.spills, strict=True)]
        )
        return {
            int(sample_of[row]): NearDuplicate(int(sample_of[hit.match]), hit.similarity) for row, hit in found.items()
        }

    # -- pass 3: split, write shards and conversations ---------------------------------------------------------------
    def _write(
        self, out: DatasetPaths, near_duplicates: dict[int, NearDuplicate], progress: Progress
    ) -> dict[str, Any]:
        data = self.data
        samples = self.samples
        status = np.frombuffer(samples.status, dtype=np.uint8)
        reasons = np.frombuffer(samples.reason, dtype=np.uint8)
        kept_mask = (status == OK) & (reasons == KEPT)
        if near_duplicates:
            kept_mask[np.fromiter(near_duplicates, dtype=np.int64)] = False
        kept_samples = np.flatnonzero(kept_mask)
        is_val = _split(len(kept_samples), data.val_fraction, data.seed)
        lengths = np.frombuffer(samples.length, dtype=np.int32)[kept_samples]
        train_lengths = lengths[~is_val]
        resolved_length = None
        if data.packing:
            longest = int(train_lengths.max()) if len(train_lengths) else 1
            resolved_length = packing_length(data.packing_length, longest, data.max_seq_len)
        train_writer = ShardWriter(out, "train", len(train_lengths), data.shard_rows, resolved_length)
        val_writer = ShardWriter(out, "val", int(is_val.sum()), data.shard_rows)
        sample_val = np.zeros(len(samples), dtype=bool)
        sample_val[kept_samples[is_val]] = True
        task_id = progress.add_task("write shards", total=len(samples))
        report_row: tuple[bool, dict[str, Any]] | None = None
        with (
            out.conversations("train").open("w", encoding="utf-8") as train_jsonl,
            out.conversations("val").open("w", encoding="utf-8") as val_jsonl,
        ):
            for path, first, count in self.spills:
                chunk_status = status[first : first + count]
                if not (chunk_status == OK).any():
                    progress.update(task_id, advance=count)
                    continue
                table = pq.read_table(path, columns=["raw", "conversation", "input_ids", "labels", "source", "row"])
                conversations = table.column("conversation").to_pylist()
                raws = table.column("raw")
                train_rows: list[int] = []
                val_rows: list[int] = []
                for position in np.flatnonzero(chunk_status == OK).tolist():
                    index = first + position
                    if index in near_duplicates:
                        hit = near_duplicates[index]
                        detail = f"~{hit.similarity:.2f} similar to {samples.where(hit.match, self.source_names)}"
                        self._reject_spilled(index, raws[position].as_py(), "near_duplicate", detail, "near_duplicate")
                    elif reasons[index] != KEPT:
                        reason, detail = self._tokenize_rejection(index)
                        self._reject_spilled(index, raws[position].as_py(), reason, detail, "tokenize")
                    elif sample_val[index]:
                        val_rows.append(position)
                        val_jsonl.write(conversations[position] + "\n")
                    else:
                        train_rows.append(position)
                        train_jsonl.write(conversations[position] + "\n")
                if report_row is None or report_row[0]:  # none yet, or a validation row while train has none
                    candidate = self._report_candidate(table, train_rows, val_rows)
                    if candidate is not None and (report_row is None or not candidate[0]):
                        report_row = candidate
                tokenized = table.select(["input_ids", "labels", "source", "row"])
                train_writer.add(tokenized.take(np.array(train_rows, dtype=np.int64)))
                val_writer.add(tokenized.take(np.array(val_rows, dtype=np.int64)))
                progress.update(task_id, advance=count)
        shards = {"train": train_writer.close(), "val": val_writer.close()}
        kept_lengths = lengths.tolist()
        trainable = np.frombuffer(samples.trainable, dtype=np.int32)[kept_samples]
        truncated = np.frombuffer(samples.truncated, dtype=np.uint8)[kept_samples]
        self.build.token_lengths = kept_lengths
        self.build.sample_for_report = report_row[1] if report_row else None
        return {
            "counts": {
                "kept": len(kept_samples),
                "train_rows": int((~is_val).sum()),
                "val_rows": int(is_val.sum()),
                "train_samples": train_writer.samples,
            },
            "tokens": {
                "total": int(lengths.sum()),
                "trainable": int(trainable.sum()),
                "max": int(lengths.max()) if len(lengths) else 0,
                "mean": round(float(lengths.sum()) / len(lengths), 1) if len(lengths) else 0,
                "p50": _percentile(lengths, 50),
                "p95": _percentile(lengths, 95),
                "truncated_rows": int(truncated.sum()),
            },
            "packing": {
                "enabled": data.packing,
                "max_seq_len": data.max_seq_len,
                "efficiency": round(train_writer.efficiency, 4) if data.packing else None,
                "length": resolved_length,
            },
            "shards": shards,
        }

    def _tokenize_rejection(self, index: int) -> tuple[str, str]:
        reason = self.samples.reason[index]
        if reason == RENDER_ERROR:
            return self.render_errors[index]
        return TOKENIZE_REASONS[reason], tokenize_detail(reason, self.samples.length[index], self.data)

    def _reject_spilled(self, index: int, raw: str | None, reason: str, detail: str, stage: str) -> None:
        samples = self.samples
        line = samples.line[index]
        entry = {
            "source": self.source_names[samples.source[index]],
            "line": None if line < 0 else line,
            "row": samples.row[index],
            "reason": reason,
            "detail": detail,
            "data": json.loads(raw) if raw is not None else None,
            "raw": None,
        }
        self.quarantine.add(stage, entry)

    def _report_candidate(self, table: Any, train_rows: list[int], val_rows: list[int]) -> tuple[bool, dict] | None:
        """The report's sample row: the first train row (else the first validation row); (is validation, sample)."""
        rows, is_val = (train_rows, False) if train_rows else (val_rows, True)
        if not rows:
            return None
        position = rows[0]
        conversation = json.loads(table.column("conversation")[position].as_py())
        input_ids = table.column("input_ids")[position].as_py()
        labels = table.column("labels")[position].as_py()
        return is_val, {
            "source": conversation["source"],
            "line": conversation["line"],
            "tokens": [self.build.tokenizer.decode([token]) for token in input_ids],
            "trained": [label != -100 for label in labels],
        }


def _prepared_rows(records: list[RawRecord], source_config: Any) -> Iterator[dict[str, Any]]:
    """The first records as format detection sees them (rows that fail to parse or map are skipped)."""
    for record in records:
        if record.error is not None:
            continue
        try:
            yield prepare_record(record.data, source_config)
        except RowError:
            continue


def _sample_entry(record: RawRecord, reason: str, detail: str) -> dict[str, Any]:
    return {
        "source": record.source,
        "line": record.line,
        "row": record.row,
        "reason": reason,
        "detail": detail,
        "data": record.data,
        "raw": None,
    }


def _split(kept: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which kept rows (in order) are validation rows: a seeded shuffle, the first `val_fraction` of it."""
    order = list(range(kept))
    random.Random(seed).shuffle(order)
    val_count = round(kept * val_fraction)
    if val_fraction > 0 and kept >= 2:
        val_count = max(1, val_count)
    if kept - val_count < 1:
        raise DataError(
            f"only {kept} row(s) survived the filters: nothing left to train on",
            hint="see quarantine.jsonl for why rows were rejected, and relax data.filters",
        )
    is_val = np.zeros(kept, dtype=bool)
    is_val[order[:val_count]] = True
    return is_val


def _percentile(values: np.ndarray, percent: float) -> int:
    if not len(values):
        return 0
    ordered = np.sort(values)
    return int(ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))])
