"""The prepared dataset: `manifest.json` (typed) and the folder it describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from tuneloop.artifacts._json import ArtifactPart, JsonArtifact
from tuneloop.workspace import DatasetPaths


class SourceInfo(ArtifactPart):
    path: str = Field(description="The file read (absolute).")
    configured_path: str = Field(description="The path as the config wrote it.")
    format: str = Field(description="Row format used (detected when the config said `auto`).")
    rows_read: int
    rows_usable: int
    provenance: dict[str, Any] | None = Field(
        None, description="The sidecar provenance next to the file (`FILE.provenance.json`), as its generator wrote it."
    )


class Counts(ArtifactPart):
    rows_read: int
    kept: int
    train_rows: int
    val_rows: int
    train_samples: int = Field(description="Training samples after packing (= train_rows without packing).")
    quarantined: int
    filtered: dict[str, int] = Field(description="Rejected rows per reason.")


class TokenStats(ArtifactPart):
    total: int
    trainable: int = Field(description="Tokens that carry loss.")
    max: int
    mean: float
    p50: int
    p95: int
    truncated_rows: int


class PackingInfo(ArtifactPart):
    enabled: bool
    max_seq_len: int
    efficiency: float | None = Field(None, description="Share of packed positions holding real tokens.")
    length: int | None = Field(None, description="Tokens per packed sample (`data.packing_length` resolved).")


class TokenizerInfo(ArtifactPart):
    class_name: str = Field(alias="class")
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    pad_equals_eos: bool

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)


class ModelInfo(ArtifactPart):
    base: str
    chat_template_source: str


class DatasetManifest(JsonArtifact):
    dataset_id: str
    kind: Literal["sft", "preference"] = Field(
        "sft", description="`sft`: tokenized rows with labels; `preference`: prompt/chosen/rejected pairs (DPO/ORPO)."
    )
    created_at: str
    tuneloop_version: str
    pipeline_version: int
    fingerprint_inputs: dict[str, Any] = Field(description="What the dataset id is a hash of (`keys.dataset_inputs`).")
    model: ModelInfo
    config: dict[str, Any] = Field(description="The `data` and `model` sections used.")
    seconds: float
    sources: list[SourceInfo]
    counts: Counts
    tokens: TokenStats
    packing: PackingInfo
    tokenizer: TokenizerInfo
    train_on: str
    shards: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Parquet files of each split, in row order, relative to the dataset folder (empty: `<split>.parquet`).",
    )

    @property
    def source_hashes(self) -> list[str]:
        return list(self.fingerprint_inputs.get("sources", []))

    @property
    def provenance(self) -> dict[str, dict[str, Any]]:
        """Each source's sidecar provenance, by configured path (sources without one left out)."""
        return {source.configured_path: source.provenance for source in self.sources if source.provenance}


@dataclass
class PreparedDataset:
    """What `data prepare` returns and `train`/`eval` take: the folder, its manifest, and whether it was cached."""

    dataset_id: str
    paths: DatasetPaths
    manifest: DatasetManifest
    cache_hit: bool = False

    @classmethod
    def load(cls, paths: DatasetPaths, cache_hit: bool = True) -> PreparedDataset:
        manifest = DatasetManifest.load(paths.manifest)
        return cls(manifest.dataset_id, paths, manifest, cache_hit)

    @property
    def has_validation(self) -> bool:
        return self.manifest.counts.val_rows > 0

    def parquet_files(self, split: str) -> list[Path]:
        """The tokenized samples of `split` ("train" or "val"): its shards in row order (datasets prepared before
        sharding have one `<split>.parquet`)."""
        names = self.manifest.shards.get(split)
        if not names:
            return [self.paths.parquet(split)]
        return [self.paths.root / name for name in names]

    def read_table(self, split: str, columns: list[str] | None = None) -> Any:
        """All of `split`'s tokenized samples as one pyarrow table (for evaluation-sized splits; training streams the
        shards through `datasets`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pa.concat_tables([pq.read_table(path, columns=columns) for path in self.parquet_files(split)])

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary printed by `tuneloop data prepare --json`."""
        counts = self.manifest.counts
        return {
            "dataset_id": self.dataset_id,
            "path": str(self.paths.root),
            "cache_hit": self.cache_hit,
            "train_rows": counts.train_rows,
            "val_rows": counts.val_rows,
            "train_samples": counts.train_samples,
            "rows_read": counts.rows_read,
            "quarantined": counts.quarantined,
            "filtered": counts.filtered,
            "kind": self.manifest.kind,
            "detected_formats": {source.path: source.format for source in self.manifest.sources},
            "tokens": self.manifest.tokens.model_dump(),
            "report": str(self.paths.report_html),
            "quarantine": str(self.paths.quarantine),
        }
