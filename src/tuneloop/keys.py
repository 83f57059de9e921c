"""Step identity: the one module that decides which inputs name each cached step, and so what a change invalidates.

| step                 | key                | made of                                                                  |
|----------------------|--------------------|--------------------------------------------------------------------------|
| data prepare         | `dataset_key`      | source file contents, `data` section (paths left out), tokenizer identity |
| train                | `run_key`          | `train` minus operational keys (sweep, preflight, report_to, threads, logging, distributed timeout/backend), base weights content, dataset id |
| eval (`tuneloop run`) | `eval_key`         | run id, `eval` section, dataset id                                       |
| sweep study          | `sweep_study`      | project name + `train` (without `sweep`), `data`, base weights           |
| GGUF of a base       | `gguf_base_key`    | base folder weights (name, size, mtime), quantisation type               |
| GGUF of an adapter   | `gguf_adapter_key` | adapter folder content                                                   |
| vLLM zero-LoRA       | `zero_lora_key`    | the template adapter's content                                           |
| converted GGUF base  | `gguf_cache_name`  | the GGUF file's resolved path, size and modification time               |
| multi-node run id    | `job_run_id`       | project, run key, the rendezvous address (when no --run-id is given)     |

Anything not named here (project name, registry, serve, eval settings for training) does not invalidate a step;
tests/test_keys.py states the whole table. Paths never enter a key on their own: a relative `model.base` is resolved
against the config file's folder first and then identified by its weights, so two configs whose `./model` are
different models get different keys, and new weights at the same path retrain.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from functools import cache
from pathlib import Path
from typing import Any

from tuneloop.config import LoopConfig

# Bump when the prepared dataset's content or layout changes, so old caches are not reused.
DATASET_PIPELINE_VERSION = 1


def fingerprint(*parts: Any) -> str:
    """A stable sha256 over JSON-able parts (dict keys sorted)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: Path, memo: Path | None = None) -> str:
    """Content hash of a file, or of every file under a folder (relative names included).

    Memoised by each file's size and modification time, per process and, with `memo` (a JSON file), across
    processes: a base model's weights (up to hundreds of GB) are read once, not by every worker of every run."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files)
    if memo is None:
        return _tree_sha256(path.resolve(), path.is_file(), stats)
    signature = fingerprint(str(path.resolve()), stats)
    known = _read_memo(memo)
    if signature not in known:
        known = {**_read_memo(memo), signature: _tree_sha256(path.resolve(), path.is_file(), stats)}
        _write_memo(memo, known)
    return str(known[signature])


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        return dict(json.loads(memo.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}  # missing, or half-written by a concurrent process: hashing again is only slower


def _write_memo(memo: Path, known: dict[str, str]) -> None:
    import os

    memo.parent.mkdir(parents=True, exist_ok=True)
    temporary = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(known), encoding="utf-8")
    temporary.replace(memo)


@cache
def _tree_sha256(path: Path, is_file: bool, stats: tuple[tuple[str, int, int], ...]) -> str:
    if is_file:
        return file_sha256(path)
    digest = hashlib.sha256()
    for name, _, _ in stats:
        file = Path(name)
        digest.update(str(file.relative_to(path)).encode("utf-8"))
        digest.update(file_sha256(file).encode("ascii"))
    return digest.hexdigest()


# -- pipeline steps ----------------------------------------------------------------------------------------------------
def dataset_inputs(config: LoopConfig, source_hashes: list[str], tokenizer_identity: str) -> dict[str, Any]:
    """What names a prepared dataset. Source paths are left out (their content is in), so moving a file keeps the
    cache; the tokenizer's identity covers `model.base` and `model.chat_template` as far as they change tokens."""
    data = config.section_dump("data")
    data.pop("synth", None)  # how `data synth` writes source files; it never changes how sources are prepared
    data.pop("num_proc", None)  # worker processes: the prepared rows are the same whatever the number
    for source in data["sources"]:
        source.pop("path")
    return {
        "pipeline_version": DATASET_PIPELINE_VERSION,
        "sources": source_hashes,
        "data": data,
        "tokenizer": tokenizer_identity,
    }


def dataset_key(inputs: dict[str, Any]) -> str:
    """The dataset id from `dataset_inputs(...)`."""
    return "ds-" + fingerprint(inputs)[:12]


def run_key(config: LoopConfig, base_weights: str, dataset_id: str) -> str:
    """What names a training run: `--resume` continues, and `tuneloop run` reuses, only a run with this key.
    `base_weights` is `models.base_weights_fingerprint` of the resolved base model."""
    return fingerprint(_train_without_sweep(config), base_weights, dataset_id)


def eval_key(run_id: str, config: LoopConfig, dataset_id: str) -> str:
    """What names `tuneloop run`'s evaluation of a run."""
    return fingerprint(run_id, config.section_dump("eval"), dataset_id)


def sweep_study(config: LoopConfig, base_weights: str) -> str:
    """The Optuna study of a sweep: running the same sweep again extends it."""
    key = fingerprint(_train_without_sweep(config), config.section_dump("data"), base_weights)
    return f"{_slug(config.project.name)}-{key[:8]}"


def new_run_id(project: str, key: str) -> str:
    """A readable, sortable run id: project slug, time, and the head of the run key."""
    return f"{_slug(project)[:40] or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"


def job_run_id(project: str, key: str, meeting: str) -> str:
    """The run id of a multi-node job started without --run-id: every node derives the same one from the run key and
    the address the nodes meet at (a node cannot know the others' clocks)."""
    return f"{_slug(project)[:40] or 'run'}-{fingerprint(key, meeting)[:10]}"


# -- conversions and caches -----------------------------------------------------------------------------------------
def gguf_cache_name(gguf_path: Path) -> str:
    """The workspace folder a `.gguf` base model is converted into: new weights at the same path (size or
    modification time changed) convert again."""
    stat = gguf_path.stat()
    return f"gguf-{gguf_path.stem[:40]}-{fingerprint(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)[:10]}"


def gguf_base_key(base_folder: Path, quant: str) -> str:
    """A base model converted to GGUF for llama.cpp. Weights are identified by name, size and modification time
    (hashing them would cost seconds on every `tuneloop serve`)."""
    weights = sorted(base_folder.glob("*.safetensors"))
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in weights]
    return f"base-{fingerprint(str(base_folder.resolve()), stats, quant)[:16]}"


def gguf_adapter_key(adapter: Path) -> str:
    return f"lora-{tree_sha256(adapter)[:16]}"


def zero_lora_key(template_adapter: Path) -> str:
    return tree_sha256(template_adapter)[:16]


# Train settings that change how a run is operated, not what it computes: changing them resumes, not retrains.
OPERATIONAL_TRAIN_KEYS = ("sweep", "preflight", "report_to", "num_threads", "logging_every")
OPERATIONAL_DISTRIBUTED_KEYS = ("timeout_minutes", "backend")


def _train_without_sweep(config: LoopConfig) -> dict[str, Any]:
    """The `train` section minus its operational settings (the strategy stays: checkpoints differ between them)."""
    train = {key: value for key, value in config.section_dump("train").items() if key not in OPERATIONAL_TRAIN_KEYS}
    train["distributed"] = {
        key: value for key, value in train["distributed"].items() if key not in OPERATIONAL_DISTRIBUTED_KEYS
    }
    if config.train.eval_generate is not None:
        # Task metrics during training read how answers are parsed; with metric_for_best they choose the kept
        # checkpoint, so another label set or regex is another run.
        train["eval_generate_parsing"] = {"labels": config.eval.labels, "answer_regex": config.eval.answer_regex}
    return train


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
