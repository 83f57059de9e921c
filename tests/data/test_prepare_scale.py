"""Data at scale: the streamed, sharded prepare gives the same dataset whatever `data.num_proc`, writes and reads
shards, finds planted near-duplicates, and its disk-partitioned near-duplicate pass decides as the in-memory one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console

from tuneloop.config import NearDuplicateFilter
from tuneloop.config_file import load_config
from tuneloop.data.filters import drop_near_duplicates, normalised_text
from tuneloop.data.formats import Message, Sample
from tuneloop.data.near_dup import BandIndex, SignatureTask, boilerplate, init_signature_worker, sign_chunk
from tuneloop.data.prepare import dataset_identity, prepare_dataset
from tuneloop.workspace import Workspace

WORDS = [
    "river",
    "mountain",
    "quiet",
    "engine",
    "paper",
    "garden",
    "signal",
    "winter",
    "orange",
    "market",
    "circle",
    "bridge",
    "silver",
    "window",
    "music",
    "doctor",
    "planet",
    "camera",
    "forest",
    "letter",
    "island",
    "rocket",
    "summer",
    "basket",
    "pencil",
    "ladder",
    "anchor",
    "violin",
    "tunnel",
    "marble",
    "harbor",
    "desert",
    "candle",
    "jacket",
    "mirror",
    "saddle",
    "thunder",
    "velvet",
    "wizard",
    "yellow",
    "zebra",
    "copper",
    "meadow",
    "lantern",
    "puzzle",
]


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_source(path: Path, rows: int) -> dict[str, set[int]]:
    """An alpaca JSONL source of `rows` random rows with planted exact and near duplicates; the lines planted."""
    rng = random.Random(7)
    planted: dict[str, set[int]] = {"duplicate": set(), "near_duplicate": set()}
    lines: list[str] = []
    for index in range(rows):
        row = {"instruction": _sentence(rng, 8, 30), "output": _sentence(rng, 4, 20)}
        lines.append(json.dumps(row))
        if index % 400 == 0:  # the same row again, up to case and spacing
            lines.append(json.dumps({"instruction": "  " + row["instruction"].upper(), "output": row["output"]}))
            planted["duplicate"].add(len(lines))
        if index % 500 == 0:  # one word changed at the end of a long instruction: a near duplicate
            words = (row["instruction"] + " " + _sentence(rng, 100, 100)).split()
            original = {"instruction": " ".join(words), "output": row["output"]}
            lines.append(json.dumps(original))
            lines.append(json.dumps({**original, "instruction": " ".join([*words[:-1], "different"])}))
            planted["near_duplicate"].add(len(lines))
    path.write_text("\n".join(lines) + "\n")
    return planted


def _config(tmp_path: Path, tiny_model_dir: Path, source: Path, name: str, **data: object) -> Path:
    config = {
        "model": {"base": str(tiny_model_dir)},
        "data": {
            "sources": [{"path": str(source)}],
            "max_seq_len": 1024,
            "filters": {"toxicity": {"enabled": False}},
            **data,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _files(root: Path) -> dict[str, bytes]:
    """The dataset's row files (parquet compared by content: the writer's metadata is not part of the data)."""
    contents = {}
    for path in sorted(root.iterdir()):
        if path.suffix == ".jsonl":
            contents[path.name] = path.read_bytes()
        elif path.suffix == ".parquet":
            contents[path.name] = json.dumps(pq.read_table(path).to_pydict()).encode()
    return contents


@pytest.mark.slow
def test_same_dataset_whatever_num_proc_with_shards_and_near_duplicates(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = tmp_path / "rows.jsonl"
    planted = write_source(source, 12_000)
    quiet = Console(stderr=True, quiet=True)
    prepared = {}
    for num_proc in (1, 2):
        config = load_config(
            _config(tmp_path, tiny_model_dir, source, f"np{num_proc}", num_proc=num_proc, shard_rows=3000)
        )
        prepared[num_proc] = prepare_dataset(config, Workspace(tmp_path / f"ws{num_proc}"), console=quiet)
    one, two = prepared[1], prepared[2]
    assert one.dataset_id == two.dataset_id  # num_proc is not part of the fingerprint
    assert _files(one.paths.root) == _files(two.paths.root)
    assert one.manifest.counts == two.manifest.counts and one.manifest.tokens == two.manifest.tokens
    assert one.manifest.shards == two.manifest.shards

    # shards: the packed train split in several files, listed in the manifest and read back in order
    counts = one.manifest.counts
    assert len(one.manifest.shards["train"]) == -(-counts.train_rows // 3000) >= 3
    assert one.manifest.shards["train"][0] == "train-00000-of-00004.parquet"
    assert one.manifest.shards["val"] == ["val.parquet"]
    assert not (one.paths.root / "_scratch").exists()
    from tuneloop.train.inputs import load_splits

    train, val = load_splits(one)
    assert len(train) == counts.train_samples and val is not None and len(val) == counts.val_rows
    rows_packed = sum(len(sample["seq_lengths"]) for sample in train)
    assert rows_packed == counts.train_rows
    assert all(len(sample["input_ids"]) <= one.manifest.packing.length for sample in train)

    # the planted duplicates are found, and nothing else is dropped
    quarantine = [json.loads(line) for line in one.paths.quarantine.read_text().splitlines()]
    found = {reason: {entry["line"] for entry in quarantine if entry["reason"] == reason} for reason in planted}
    assert found["duplicate"] == planted["duplicate"]
    # MinHash estimates similarity: nothing unplanted is dropped, and (almost) every planted copy is found
    assert found["near_duplicate"] <= planted["near_duplicate"]
    assert len(found["near_duplicate"]) >= 0.9 * len(planted["near_duplicate"])
    assert counts.quarantined == len(planted["duplicate"]) + len(found["near_duplicate"])
    near = next(entry for entry in quarantine if entry["reason"] == "near_duplicate")
    assert near["data"]["instruction"].endswith("different") and "similar to" in near["detail"]


def test_unpacked_shards_keep_row_order(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = tmp_path / "rows.jsonl"
    write_source(source, 900)
    config = load_config(_config(tmp_path, tiny_model_dir, source, "plain", packing=False, shard_rows=200, num_proc=1))
    prepared = prepare_dataset(config, Workspace(tmp_path / "ws"), console=Console(stderr=True, quiet=True))
    files = prepared.parquet_files("train")
    assert len(files) == len(prepared.manifest.shards["train"]) == -(-prepared.manifest.counts.train_rows // 200)
    rows = [row for path in files for row in pq.read_table(path, columns=["row"]).column("row").to_pylist()]
    conversations = [json.loads(line)["row"] for line in prepared.paths.conversations("train").read_text().splitlines()]
    assert rows == conversations == sorted(rows)  # shards concatenate to the train rows in source order
    assert prepared.read_table("val").num_rows == prepared.manifest.counts.val_rows


def test_num_proc_is_left_out_of_the_dataset_id(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = tmp_path / "rows.jsonl"
    write_source(source, 10)
    workspace = Workspace(tmp_path / "ws")
    ids = {
        dataset_identity(
            load_config(_config(tmp_path, tiny_model_dir, source, f"n{n}", num_proc=n)), workspace
        ).dataset_id
        for n in (1, 2)
    }
    assert len(ids) == 1


def test_partitioned_near_duplicates_decide_as_the_in_memory_filter(tmp_path: Path) -> None:
    """Chains (a ~ b ~ c, a !~ c), groups and boilerplate: the greedy keep-the-first decisions are the same."""
    rng = random.Random(3)
    system = "you are a helpful assistant answer the question carefully and briefly"
    texts: list[str] = []
    for _ in range(300):
        words = _sentence(rng, 30, 50).split()
        texts.append(" ".join(words))
        for _ in range(rng.randint(0, 3)):  # drift: each copy changes a word or two of the previous one
            words = list(words)
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
    rng.shuffle(texts)
    samples = [
        Sample([Message("system", system), Message("user", text), Message("assistant", "ok", True)], "chat", "s", i, i)
        for i, text in enumerate(texts, start=1)
    ]
    config = NearDuplicateFilter(threshold=0.8)
    _, rejected = drop_near_duplicates(samples, config)
    expected = {rejection.sample.row - 1 for rejection in rejected}
    assert 30 < len(expected) < len(texts) // 2

    import pyarrow as pa

    normalised = [normalised_text(sample) for sample in samples]
    spill = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": normalised}), spill)
    init_signature_worker(config, boilerplate(normalised, len(normalised), config.ngram))
    index = BandIndex(config, tmp_path / "bands")
    for start in range(0, len(texts), 128):  # several chunks, as workers return them
        positions = list(range(start, min(start + 128, len(texts))))
        index.add(sign_chunk(SignatureTask(spill, np.array(positions))))
    assert set(index.resolve()) == expected
