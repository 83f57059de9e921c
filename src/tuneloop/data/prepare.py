"""`tuneloop data prepare`: sources -> normalised conversations -> filters -> rendered, tokenized, split (and packed)
dataset artifact in the workspace, named by a content fingerprint.

Artifact layout (`<workspace>/datasets/<dataset_id>/`):
    train.parquet, val.parquet   tokenized samples (input_ids, labels[, position_ids, seq_lengths]); a split of more
                                 than `data.shard_rows` rows is sharded: train-00000-of-00004.parquet, ... (the
                                 manifest's `shards` lists them; `PreparedDataset.parquet_files` reads them)
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
from tuneloop.data.chunks import quarantine_entry
from tuneloop.data.filters import Rejection, drop_exact_duplicates, drop_near_duplicates, drop_toxic
from tuneloop.data.formats import Sample
from tuneloop.data.render import Rendered
from tuneloop.data.sources import BUILTIN_PREFIX, RawRecord
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
    """One preparation run. SFT data is built streamed (`sft_build`); the in-memory stages below serve the
    preference build (`preference.build_preference`), whose pair datasets are small."""

    config: LoopConfig
    data: DataConfig
    tokenizer: Any
    console: Console
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)
    sample_for_report: dict[str, Any] | None = None
    token_lengths: list[int] = field(default_factory=list)

    def run(self, source_paths: list[Path], out: DatasetPaths) -> dict[str, Any]:
        from tuneloop.data.preference import build_preference, check_not_mixed, source_kinds

        if check_not_mixed(self.data.sources, source_kinds(self.data.sources, source_paths)):
            return build_preference(self, source_paths, out)  # pairs for DPO/ORPO: data/preference.py
        from tuneloop.data.sft_build import build_sft

        return build_sft(self, source_paths, out)  # streamed, in worker processes, sharded: data/sft_build.py

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

    # -- quality filters (in memory) ---------------------------------------------------------------------------
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

    # -- split, quarantine -----------------------------------------------------------------------------------
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

    def _write_quarantine(self, out: DatasetPaths) -> None:
        with out.quarantine.open("w", encoding="utf-8") as handle:
            for entry in self.quarantine:
                handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    # -- quarantine -----------------------------------------------------------------------------------------------
    def _reject(self, record: RawRecord, reason: str, detail: str) -> None:
        self.filtered[reason] += 1
        self.quarantine.append(quarantine_entry(record, reason, detail))

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
