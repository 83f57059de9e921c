"""`tuneloop data prepare`: sources -> normalised conversations -> filters -> rendered, tokenized, split (and packed)
dataset artifact in the workspace, named by a content fingerprint.

Artifact layout (`<workspace>/datasets/<dataset_id>/`):
    train.parquet, val.parquet   tokenized samples (input_ids, labels[, position_ids, seq_lengths])
    train.jsonl, val.jsonl       the normalised conversations with their source and line (for eval and humans)
    quarantine.jsonl             every rejected row: source, line, row, reason, detail, the row itself
    manifest.json                counts, token statistics, detected formats, tokenizer identity, config
    report.md, report.html, token_lengths.png
(paths: `workspace.DatasetPaths`; the manifest: `artifacts.DatasetManifest`; the id: `keys.dataset_key`).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuneloop import __version__
from tuneloop.artifacts.dataset import DatasetManifest, PreparedDataset
from tuneloop.config import DataConfig, LoopConfig, SourceConfig
from tuneloop.data import demo
from tuneloop.data.filters import Rejection, drop_exact_duplicates, drop_near_duplicates, drop_toxic
from tuneloop.data.formats import RowError, Sample, detect_format, normalise, prepare_record
from tuneloop.data.pack import pack, packing_efficiency, packing_length
from tuneloop.data.render import ChatRenderer, Rendered, RenderedText, truncate
from tuneloop.data.sources import BUILTIN_PREFIX, RawRecord, read_records
from tuneloop.errors import ConfigError, DataError
from tuneloop.keys import DATASET_PIPELINE_VERSION, dataset_inputs, dataset_key, tree_sha256
from tuneloop.models import chat_template_source, configured_base, load_tokenizer, tokenizer_fingerprint
from tuneloop.workspace import DatasetPaths, Workspace

FILTER_REASONS = (
    "malformed",
    "missing_field",
    "duplicate",
    "near_duplicate",
    "toxic",
    "too_short",
    "too_long",
    "no_trainable_tokens",
    "render_error",
)
_ENCODE_BATCH = 2048


def prepare_dataset(
    config: LoopConfig, workspace: Workspace, force: bool = False, console: Console | None = None
) -> PreparedDataset:
    """Build the dataset artifact for `config`, or return the cached one with the same fingerprint."""
    console = console or Console(stderr=True)
    data = config.data
    with console.status(f"loading tokenizer of {config.model.base}"):
        identity = dataset_identity(config, workspace)
    source_paths, tokenizer, inputs = identity.source_paths, identity.tokenizer, identity.inputs
    dataset_id = dataset_key(inputs)
    target = workspace.dataset(dataset_id)
    if target.manifest.exists() and not force:
        return PreparedDataset.load(target)

    started = time.perf_counter()
    staging = workspace.dataset_staging(dataset_id)
    shutil.rmtree(staging.root, ignore_errors=True)
    staging.root.mkdir(parents=True)
    try:
        build = _Build(config, data, tokenizer, console)
        built = build.run(source_paths, staging)
        manifest = DatasetManifest.model_validate(
            {
                **built,
                "dataset_id": dataset_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tuneloop_version": __version__,
                "pipeline_version": DATASET_PIPELINE_VERSION,
                "fingerprint_inputs": inputs,
                "model": {"base": config.model.base, "chat_template_source": chat_template_source(tokenizer)},
                "config": {"data": config.section_dump("data"), "model": config.section_dump("model")},
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        from tuneloop.data.report import write_report

        write_report(staging, manifest, build.sample_for_report, build.token_lengths, build.quarantine[:20])
        manifest.save(staging.manifest)
        if force:
            shutil.rmtree(target.root, ignore_errors=True)
        try:
            staging.root.rename(target.root)
        except OSError:  # a concurrent run with the same fingerprint won: its artifact is identical
            shutil.rmtree(staging.root, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging.root, ignore_errors=True)
        raise
    return PreparedDataset.load(target, cache_hit=False)


@dataclass
class DatasetIdentity:
    """What names a dataset (`keys.dataset_inputs`) and what was loaded to know it."""

    source_paths: list[Path]
    tokenizer: Any
    inputs: dict[str, Any]

    @property
    def dataset_id(self) -> str:
        return dataset_key(self.inputs)


def dataset_identity(config: LoopConfig, workspace: Workspace) -> DatasetIdentity:
    """The dataset id `config` prepares to, without preparing it: source contents and the tokenizer's identity."""
    if not config.data.sources:
        raise ConfigError(
            "data.sources is empty", hint="add at least one source, e.g. data.sources: [{path: my.jsonl}]"
        )
    source_paths = [_source_path(config, source, workspace) for source in config.data.sources]
    tokenizer = load_tokenizer(configured_base(config, workspace), config.chat_template_spec())
    inputs = dataset_inputs(config, [tree_sha256(path) for path in source_paths], tokenizer_fingerprint(tokenizer))
    return DatasetIdentity(source_paths, tokenizer, inputs)


def _source_path(config: LoopConfig, source: SourceConfig, workspace: Workspace) -> Path:
    if source.path.startswith(BUILTIN_PREFIX):
        name = source.path[len(BUILTIN_PREFIX) :]
        try:
            return demo.builtin_path(name, source.num_rows, workspace)
        except KeyError:
            raise ConfigError(
                f"unknown built-in dataset {source.path!r}", hint=f"use builtin:{demo.DEMO_NAME}"
            ) from None
    return config.resolve_path(source.path)


@dataclass
class _Build:
    """One preparation run; holds the quarantine and counters while stages run."""

    config: LoopConfig
    data: DataConfig
    tokenizer: Any
    console: Console
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)
    sample_for_report: dict[str, Any] | None = None
    token_lengths: list[int] = field(default_factory=list)
    _packing_efficiency: float | None = None
    _packing_length: int | None = None

    def run(self, source_paths: list[Path], out: DatasetPaths) -> dict[str, Any]:
        with self._progress() as progress:
            samples, sources_info = self._read_all(source_paths, progress)
            rows_read = sum(info["rows_read"] for info in sources_info)
            samples = self._filter(samples, progress)
            rendered = self._tokenize(samples, progress)
        train_pairs, val_pairs = self._split(rendered)
        train_samples = self._write_splits(out, train_pairs, val_pairs)
        self._write_quarantine(out)
        kept_lengths = [len(item.input_ids) for _, item in train_pairs + val_pairs]
        trainable = sum(item.num_trainable for _, item in train_pairs + val_pairs)
        tokens = {
            "total": sum(kept_lengths),
            "trainable": trainable,
            "max": max(kept_lengths, default=0),
            "mean": round(statistics.fmean(kept_lengths), 1) if kept_lengths else 0,
            "p50": _percentile(kept_lengths, 50),
            "p95": _percentile(kept_lengths, 95),
            "truncated_rows": sum(1 for _, item in train_pairs + val_pairs if item.truncated),
        }
        self.token_lengths = kept_lengths
        self.sample_for_report = self._report_sample(train_pairs or val_pairs)
        return {
            "sources": sources_info,
            "counts": {
                "rows_read": rows_read,
                "kept": len(train_pairs) + len(val_pairs),
                "train_rows": len(train_pairs),
                "val_rows": len(val_pairs),
                "train_samples": train_samples,
                "quarantined": len(self.quarantine),
                "filtered": {reason: self.filtered.get(reason, 0) for reason in FILTER_REASONS},
            },
            "tokens": tokens,
            "packing": {
                "enabled": self.data.packing,
                "max_seq_len": self.data.max_seq_len,
                "efficiency": self._packing_efficiency,
                "length": self._packing_length,
            },
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "eos_token": self.tokenizer.eos_token,
                "eos_token_id": self.tokenizer.eos_token_id,
                "pad_token": self.tokenizer.pad_token,
                "pad_token_id": self.tokenizer.pad_token_id,
                "pad_equals_eos": self.tokenizer.pad_token_id == self.tokenizer.eos_token_id,
            },
            "train_on": self.data.train_on,
        }

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    # -- stage 1: read and normalise ---------------------------------------------------------------------------
    def _read_all(self, source_paths: list[Path], progress: Progress) -> tuple[list[Sample], list[dict[str, Any]]]:
        samples: list[Sample] = []
        info: list[dict[str, Any]] = []
        for source_config, path in zip(self.data.sources, source_paths, strict=True):
            task = progress.add_task(f"read {path.name}", total=None)
            records = list(read_records(path, source_config.split, source_config.limit))
            fmt = source_config.format
            prepared: list[tuple[RawRecord, dict[str, Any] | None]] = []
            for record in records:
                if record.error is not None:
                    self._reject(record, "malformed", record.error)
                    prepared.append((record, None))
                    continue
                try:
                    prepared.append((record, prepare_record(record.data, source_config)))
                except RowError as error:
                    self._reject(record, error.reason, error.detail)
                    prepared.append((record, None))
            if fmt == "auto":
                fmt = detect_format((row for _, row in prepared[:200] if row is not None), str(path))
                self.console.print(f"[cyan]{path.name}[/]: detected format [bold]{fmt}[/]")
            before = len(samples)
            for record, row in prepared:
                if row is None:
                    continue
                try:
                    messages, kind = normalise(row, fmt, source_config)
                except RowError as error:
                    self._reject(record, error.reason, error.detail)
                    continue
                samples.append(Sample(messages, kind, str(path), record.row, record.line, raw=record.data))
            progress.update(task, total=len(records), completed=len(records))
            info.append(
                {
                    "path": str(path),
                    "configured_path": source_config.path,
                    "format": fmt,
                    "rows_read": len(records),
                    "rows_usable": len(samples) - before,
                }
            )
        return samples, info

    # -- stage 2: quality filters -----------------------------------------------------------------------------
    def _filter(self, samples: list[Sample], progress: Progress) -> list[Sample]:
        filters = self.data.filters
        steps: list[tuple[str, Any]] = []
        if filters.exact_duplicates:
            steps.append(("exact duplicates", drop_exact_duplicates))
        if filters.toxicity.enabled:
            steps.append(("toxicity", lambda rows: drop_toxic(rows, filters.toxicity)))
        if filters.near_duplicates.enabled:
            steps.append(("near duplicates", lambda rows: drop_near_duplicates(rows, filters.near_duplicates)))
        for name, step in steps:
            task = progress.add_task(f"filter {name}", total=len(samples))
            samples, rejected = step(samples)
            self._reject_samples(rejected)
            progress.update(task, completed=progress.tasks[task].total)
        return samples

    # -- stage 3: render, tokenize, length filters --------------------------------------------------------------
    def _tokenize(self, samples: list[Sample], progress: Progress) -> list[tuple[Sample, Rendered]]:
        renderer = ChatRenderer(self.tokenizer, self.data.train_on)
        filters = self.data.filters
        max_tokens = filters.max_tokens or (None if self.data.truncation else self.data.max_seq_len)
        task = progress.add_task("render + tokenize", total=len(samples))
        kept: list[tuple[Sample, Rendered]] = []
        for start in range(0, len(samples), _ENCODE_BATCH):
            batch: list[tuple[Sample, RenderedText]] = []
            for sample in samples[start : start + _ENCODE_BATCH]:
                try:
                    batch.append((sample, renderer.render_text(sample)))
                except RowError as error:
                    self._reject_samples([Rejection(sample, error.reason, error.detail)])
            encoded = renderer.encode([text for _, text in batch])
            for (sample, _), rendered in zip(batch, encoded, strict=True):
                size = len(rendered.input_ids)
                if size < filters.min_tokens:
                    reason, detail = "too_short", f"{size} tokens < min_tokens={filters.min_tokens}"
                elif max_tokens is not None and size > max_tokens:
                    reason, detail = "too_long", f"{size} tokens > {max_tokens}"
                else:
                    rendered = truncate(rendered, self.data.max_seq_len)
                    if rendered.num_trainable == 0:
                        reason, detail = "no_trainable_tokens", "no token carries loss (after truncation)"
                    else:
                        kept.append((sample, rendered))
                        continue
                self._reject_samples([Rejection(sample, reason, detail)])
            progress.update(task, completed=min(start + _ENCODE_BATCH, len(samples)))
        return kept

    # -- stage 4: split, pack, write ------------------------------------------------------------------------------
    def _split(self, rendered: list[tuple[Sample, Rendered]]) -> tuple[list[Any], list[Any]]:
        order = list(range(len(rendered)))
        random.Random(self.data.seed).shuffle(order)
        val_count = round(len(rendered) * self.data.val_fraction)
        if self.data.val_fraction > 0 and len(rendered) >= 2:
            val_count = max(1, val_count)
        if len(rendered) - val_count < 1:
            raise DataError(
                f"only {len(rendered)} row(s) survived the filters: nothing left to train on",
                hint="see quarantine.jsonl for why rows were rejected, and relax data.filters",
            )
        val_index = set(order[:val_count])
        train = [rendered[i] for i in range(len(rendered)) if i not in val_index]
        val = [rendered[i] for i in sorted(val_index)]
        return train, val

    def _write_splits(self, out: DatasetPaths, train: list[Any], val: list[Any]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def conversations(pairs: list[tuple[Sample, Rendered]], path: Path) -> None:
            with path.open("w", encoding="utf-8") as handle:
                for sample, _ in pairs:
                    row = {
                        "messages": [{"role": m.role, "content": m.content} for m in sample.messages],
                        "kind": sample.kind,
                        "source": sample.source,
                        "line": sample.line,
                        "row": sample.row,
                    }
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

        conversations(train, out.conversations("train"))
        conversations(val, out.conversations("val"))

        def unpacked_table(pairs: list[tuple[Sample, Rendered]]) -> Any:
            return pa.table(
                {
                    "input_ids": [item.input_ids for _, item in pairs],
                    "labels": [item.labels for _, item in pairs],
                    "source": [sample.source for sample, _ in pairs],
                    "row": [sample.row for sample, _ in pairs],
                },
                schema=pa.schema(
                    [
                        ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32())),
                        ("source", pa.string()),
                        ("row", pa.int64()),
                    ]
                ),
            )

        pq.write_table(unpacked_table(val), out.parquet("val"))
        if not self.data.packing:
            pq.write_table(unpacked_table(train), out.parquet("train"))
            return len(train)
        longest = max((len(item.input_ids) for _, item in train), default=1)
        self._packing_length = packing_length(self.data.packing_length, longest, self.data.max_seq_len)
        packed = pack([(item.input_ids, item.labels) for _, item in train], self._packing_length)
        self._packing_efficiency = round(packing_efficiency(packed, self._packing_length), 4)
        table = pa.table(
            {
                "input_ids": [sample.input_ids for sample in packed],
                "labels": [sample.labels for sample in packed],
                "position_ids": [sample.position_ids for sample in packed],
                "seq_lengths": [sample.seq_lengths for sample in packed],
            },
            schema=pa.schema(
                [
                    ("input_ids", pa.list_(pa.int32())),
                    ("labels", pa.list_(pa.int32())),
                    ("position_ids", pa.list_(pa.int32())),
                    ("seq_lengths", pa.list_(pa.int32())),
                ]
            ),
        )
        pq.write_table(table, out.parquet("train"))
        return len(packed)

    def _write_quarantine(self, out: DatasetPaths) -> None:
        with out.quarantine.open("w", encoding="utf-8") as handle:
            for entry in self.quarantine:
                handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def _report_sample(self, pairs: list[tuple[Sample, Rendered]]) -> dict[str, Any] | None:
        if not pairs:
            return None
        sample, rendered = pairs[0]
        pieces = [self.tokenizer.decode([token]) for token in rendered.input_ids]
        return {
            "source": sample.source,
            "line": sample.line,
            "tokens": pieces,
            "trained": [label != -100 for label in rendered.labels],
        }

    # -- quarantine -----------------------------------------------------------------------------------------------
    def _reject(self, record: RawRecord, reason: str, detail: str) -> None:
        self.filtered[reason] += 1
        self.quarantine.append(
            {
                "source": record.source,
                "line": record.line,
                "row": record.row,
                "reason": reason,
                "detail": detail,
                "data": record.data if record.error is None else None,
                "raw": record.raw_text,
            }
        )

    def _reject_samples(self, rejections: list[Rejection]) -> None:
        for rejection in rejections:
            sample = rejection.sample
            self.filtered[rejection.reason] += 1
            self.quarantine.append(
                {
                    "source": sample.source,
                    "line": sample.line,
                    "row": sample.row,
                    "reason": rejection.reason,
                    "detail": rejection.detail,
                    "data": sample.raw,
                    "raw": None,
                }
            )


def _percentile(values: list[int], percent: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]
