"""Near-duplicate detection at scale: MinHash signatures computed in workers, LSH bands partitioned on disk.

Same decisions as `filters.drop_near_duplicates` (datasketch MinHash over word n-gram shingles, its LSH banding for
the threshold, the first row of a group kept, a candidate confirmed by its estimated Jaccard), without holding every
MinHash in one process:

1. boilerplate: shingles found in more than half of the rows are dropped first (a shared system prompt). Counted over
   every row up to `BOILERPLATE_SAMPLE` rows, beyond that over that many rows evenly spaced through the data.
2. workers compute each row's signature (`num_perm` x uint32) and one 64-bit key per LSH band; the main process
   appends signatures to one file (memory-mapped later) and band keys to `PARTITIONS` files by key.
3. each partition is loaded on its own and only keys that occur at least twice are kept (rows that share no band with
   any other row can neither be nor have a near-duplicate, which is almost every row).
4. the greedy pass walks the rows with shared bands in order: a row's candidate is the first kept row of each of its
   buckets (what `MinHashLSH.query` + `min` returned), confirmed against the threshold with the two signatures.

Memory: the signatures and keys live on disk; RAM holds one partition, then the shared-bucket entries only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneloop.config import NearDuplicateFilter
from tuneloop.data.filters import shingles

BOILERPLATE_SAMPLE = 20_000
BOILERPLATE_SHARE = 0.5
PARTITIONS = 16
_ENTRY = np.dtype([("key", "<u8"), ("row", "<u4")])
_BAND_SEED = 20261127


def lsh_bands(config: NearDuplicateFilter) -> list[tuple[int, int]]:
    """datasketch's band ranges for the configured threshold (capped at 0.9: banding cannot represent more)."""
    from datasketch import MinHashLSH

    return list(MinHashLSH(threshold=min(config.threshold, 0.9), num_perm=config.num_perm).hashranges)


def boilerplate_sample(total_rows: int) -> np.ndarray:
    """Which rows (by position among the rows checked) the boilerplate count reads."""
    if total_rows <= BOILERPLATE_SAMPLE:
        return np.arange(total_rows)
    return np.unique(np.linspace(0, total_rows - 1, BOILERPLATE_SAMPLE).round().astype(np.int64))


def boilerplate(texts: list[str], total_rows: int, ngram: int) -> frozenset[bytes]:
    """Shingles in more than half of `texts` (the sampled normalised texts), when there are 20 rows or more."""
    if total_rows < 20 or not texts:
        return frozenset()
    shingle_sets = [shingles(text, ngram) for text in texts]
    # Count by hash in numpy: a Counter of every distinct shingle of 20k long rows would take gigabytes.
    hashes = np.concatenate([np.fromiter(map(hash, row), dtype=np.int64, count=len(row)) for row in shingle_sets])
    values, counts = np.unique(hashes, return_counts=True)
    common = set(values[counts > BOILERPLATE_SHARE * len(texts)].tolist())
    if not common:
        return frozenset()
    return frozenset(shingle for row in shingle_sets for shingle in row if hash(shingle) in common)


@dataclass
class SignatureTask:
    spill: Path
    positions: np.ndarray  # the spill rows to sign (the rows that passed the earlier filters)


@dataclass
class SignatureResult:
    signatures: np.ndarray  # (rows, num_perm) uint32
    empty: np.ndarray  # bool: no shingle left (never a near-duplicate, never matched)
    band_keys: np.ndarray  # (rows, bands) uint64


class _SignatureState:
    config: NearDuplicateFilter
    common: frozenset[bytes]
    bands: list[tuple[int, int]]
    multipliers: np.ndarray


_STATE = _SignatureState()


def init_signature_worker(config: NearDuplicateFilter, common: frozenset[bytes]) -> None:
    _STATE.config = config
    _STATE.common = common
    _STATE.bands = lsh_bands(config)
    width = max(end - start for start, end in _STATE.bands)
    generator = np.random.default_rng(_BAND_SEED)
    _STATE.multipliers = generator.integers(1, 2**63, size=(len(_STATE.bands), width), dtype=np.uint64) | np.uint64(1)


def sign_chunk(task: SignatureTask) -> SignatureResult:
    import pyarrow.parquet as pq
    from datasketch import MinHash

    config, common = _STATE.config, _STATE.common
    texts = pq.read_table(task.spill, columns=["text"]).column("text").take(task.positions).to_pylist()
    shingle_sets = [shingles(text, config.ngram) for text in texts]
    if common:
        shingle_sets = [[shingle for shingle in row if shingle not in common] for row in shingle_sets]
    minhashes = MinHash.bulk(shingle_sets, num_perm=config.num_perm, seed=1)
    values = np.stack([minhash.hashvalues for minhash in minhashes]) if minhashes else np.zeros((0, config.num_perm))
    values = values.astype(np.uint64)
    keys = np.empty((len(texts), len(_STATE.bands)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band, (start, end) in enumerate(_STATE.bands):
            # A multiply-add hash of the band's values (wrapping uint64 arithmetic), salted by the band number.
            mixed = (values[:, start:end] * _STATE.multipliers[band, : end - start]).sum(axis=1, dtype=np.uint64)
            keys[:, band] = _finalise(mixed + np.uint64(band) * np.uint64(0x9E3779B97F4A7C15))
    return SignatureResult(
        signatures=values.astype(np.uint32),
        empty=np.array([not row for row in shingle_sets], dtype=bool),
        band_keys=keys,
    )


def _finalise(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (partitions use the top bits)."""
    keys = keys ^ (keys >> np.uint64(30))
    keys = keys * np.uint64(0xBF58476D1CE4E5B9)
    keys = keys ^ (keys >> np.uint64(27))
    keys = keys * np.uint64(0x94D049BB133111EB)
    return keys ^ (keys >> np.uint64(31))


@dataclass
class NearDuplicate:
    match: int  # the earlier kept row it is similar to (position among the rows checked)
    similarity: float


class BandIndex:
    """Signatures and band keys of the rows checked, on disk under `folder`, added in row order."""

    def __init__(self, config: NearDuplicateFilter, folder: Path) -> None:
        self.config = config
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._signatures = (folder / "signatures.u32").open("wb")
        self._partitions = [(folder / f"bands-{index:02d}.bin").open("wb") for index in range(PARTITIONS)]

    def add(self, result: SignatureResult) -> None:
        self._signatures.write(np.ascontiguousarray(result.signatures, dtype=np.uint32).tobytes())
        rows = np.arange(self.rows, self.rows + len(result.empty), dtype=np.uint32)
        self.rows += len(result.empty)
        signed = ~result.empty
        keys = result.band_keys[signed]
        entries = np.empty(keys.size, dtype=_ENTRY)
        entries["key"] = keys.ravel()
        entries["row"] = np.repeat(rows[signed], keys.shape[1])
        partition = (entries["key"] >> np.uint64(60)).astype(np.int64) % PARTITIONS
        for index, handle in enumerate(self._partitions):
            handle.write(entries[partition == index].tobytes())

    def resolve(self) -> dict[int, NearDuplicate]:
        """The near-duplicates among the rows added: row -> the kept row it matches."""
        self._signatures.close()
        for handle in self._partitions:
            handle.close()
        shared = [self._shared_entries(self.folder / f"bands-{index:02d}.bin") for index in range(PARTITIONS)]
        entries = np.concatenate(shared) if shared else np.empty(0, dtype=_ENTRY)
        if entries.size == 0:
            return {}
        _, buckets = np.unique(entries["key"], return_inverse=True)
        order = np.lexsort((buckets, entries["row"]))
        rows, buckets = entries["row"][order].astype(np.int64), buckets[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        signatures = np.memmap(
            self.folder / "signatures.u32", dtype=np.uint32, mode="r", shape=(self.rows, self.config.num_perm)
        )
        first_kept = np.full(int(buckets.max()) + 1, -1, dtype=np.int64)
        found: dict[int, NearDuplicate] = {}
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            row, row_buckets = int(rows[start]), buckets[start:end]
            holders = first_kept[row_buckets]
            candidates = holders[holders >= 0]
            if candidates.size:
                match = int(candidates.min())
                similarity = float(np.count_nonzero(signatures[row] == signatures[match])) / self.config.num_perm
                if similarity >= self.config.threshold:
                    found[row] = NearDuplicate(match, similarity)
                    continue
            first_kept[row_buckets[holders < 0]] = row
        return found

    @staticmethod
    def _shared_entries(path: Path) -> np.ndarray:
        entries = np.fromfile(path, dtype=_ENTRY)
        if entries.size == 0:
            return entries
        _, inverse, counts = np.unique(entries["key"], return_inverse=True, return_counts=True)
        return entries[counts[inverse] >= 2]


def sample_texts(spills: Iterable[tuple[Path, np.ndarray]], wanted: np.ndarray) -> list[str]:
    """The normalised texts of the `wanted` rows (positions among the rows checked, sorted), read from the spills;
    `spills` gives each spill file with its checked rows."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    offset = 0
    for path, positions in spills:
        low, high = np.searchsorted(wanted, [offset, offset + len(positions)])
        if high > low:
            local = positions[wanted[low:high] - offset]
            texts += pq.read_table(path, columns=["text"]).column("text").take(local).to_pylist()
        offset += len(positions)
    return texts
