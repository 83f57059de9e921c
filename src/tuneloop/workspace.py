"""The one module that knows the workspace layout. Every other module asks it for paths; none spells a file name.

Layout (default `./.tuneloop`, or `$TUNELOOP_HOME`, or `--workspace`):

    datasets/<dataset_id>/          DatasetPaths: manifest.json, {train,val}.{parquet,jsonl} (parquet sharded past
                                    data.shard_rows), quarantine.jsonl, report.*, _scratch/ while building
    runs/<run_id>/                  RunPaths: run.json, summary.json, config.json, history.json, pipeline.json,
                                    cost.md, adapter/ | model/, checkpoints/, tensorboard/, eval/<report>/ (EvalPaths)
    evals/<report>/                 EvalPaths of models that are not training runs (base, folders, registry names)
    registry/<name>/<version>/      VersionPaths: lineage.json, README.md (the model card)
    models/<name>/                  base models converted from GGUF to safetensors (once)
    exports/<reference>-<format>/   `tuneloop export` results
    serve/                          ServePaths: feedback.jsonl, traffic.jsonl, files/, batches/, engine logs
    sweeps/<study>.json, sweeps.db  Optuna sweeps
    cache/                          built-in data, gguf/ conversions, vllm-zero-lora/, registry-downloads/
    mlflow.db, mlartifacts/         the MLflow tracking + registry store (SQLite default)
    registry.lock                   serialises registry writes across processes

Accessors only build paths; `ensure()` or the writer creates folders. The artifacts written into these paths are
typed in `tuneloop.artifacts`; which inputs name each folder (dataset id, run key, eval key) is `tuneloop.keys`.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKSPACE_ENV = "TUNELOOP_HOME"
DEFAULT_WORKSPACE = ".tuneloop"


class _child:  # lower case: it reads as a declaration, `summary = _child("summary.json")`
    """A path under the owning folder's `root`: the layout reads as a table of names."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc or f"`{name}` under the folder's root."

    def __get__(self, folder: Any, owner: type | None = None) -> Path:
        return folder.root / self.name


@dataclass(frozen=True)
class DatasetPaths:
    """A prepared dataset (or its staging folder while it is being written)."""

    root: Path

    manifest = _child("manifest.json")
    quarantine = _child("quarantine.jsonl")
    report_md = _child("report.md")
    report_html = _child("report.html")
    histogram = _child("token_lengths.png")

    def parquet(self, split: str) -> Path:
        """Tokenized samples of `split` ("train" or "val")."""
        return self.root / f"{split}.parquet"

    def conversations(self, split: str) -> Path:
        """The normalised conversations of `split`, with their source and line."""
        return self.root / f"{split}.jsonl"

    def parquet_shard(self, split: str, index: int, count: int) -> Path:
        """Shard `index` of `count` of `split`'s tokenized samples; a single shard is `parquet(split)`."""
        if count <= 1:
            return self.parquet(split)
        return self.root / f"{split}-{index:05d}-of-{count:05d}.parquet"

    scratch = _child("_scratch", "Intermediate files while the dataset is prepared (spilled rows, MinHash bands).")


@dataclass(frozen=True)
class EvalPaths:
    """One evaluation report folder."""

    root: Path

    metrics = _child("metrics.json")
    report_md = _child("report.md")
    report_html = _child("report.html")

    pairwise_sheet = _child("pairwise.csv")
    pairwise_jsonl = _child("pairwise.jsonl")
    pairwise_key = _child("pairwise_key.json")

    outputs = _child("outputs.jsonl", "Every evaluated row: id, prompt, reference and each model's answer by label.")
    judge = _child("judge.jsonl", "The LLM judge's verdicts and reasons, one line per judged comparison or grade.")
    ratings = _child("ratings.jsonl", "Human ratings from /dashboard/rate (or imported): rater, row, scores, note.")
    labelstudio_tasks = _child("labelstudio_tasks.json", "The rows as Label Studio tasks, for teams annotating there.")
    labelstudio_config = _child("labelstudio_config.xml", "The Label Studio labeling interface for those tasks.")
    labelstudio_key = _child("labelstudio_key.json", "Which model each Label Studio task shows as A/B (kept here).")

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"


@dataclass(frozen=True)
class RunPaths:
    """One training run."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    record = _child(
        "run.json", "Status, key and attempts (`RunRecord`): written from the start, so a crashed run can be resumed."
    )
    summary = _child("summary.json", "The finished run's `TrainResult`; its presence means the run finished.")
    config = _child("config.json", "The full config the run was trained with.")
    history = _child("history.json", "Trainer log history (loss curves for the dashboard without opening MLflow).")
    pipeline_state = _child("pipeline.json", "`tuneloop run`'s cached step results for this run.")
    cost = _child("cost.md")
    checkpoints = _child("checkpoints")
    adapter = _child("adapter")
    model = _child("model", "Full fine-tuning's weights (instead of `adapter`).")
    tensorboard = _child("tensorboard")
    evals = _child("eval", "Evaluation reports of this run, one folder each (`EvalPaths`).")

    def new_eval(self, labels: str) -> EvalPaths:
        """A new report folder for this run's evaluation of `labels` (e.g. `tuned-vs-base`)."""
        return _new_eval(self.evals, labels)

    def rank_report(self, rank: int) -> Path:
        """What one process of a multi-process run held and trained (`RankReport`)."""
        return self.root / "ranks" / f"rank-{rank}.json"

    def eval_reports(self) -> list[EvalPaths]:
        """This run's finished evaluation reports, oldest first (report folders start with a timestamp)."""
        if not self.evals.is_dir():
            return []
        return [EvalPaths(path.parent) for path in sorted(self.evals.glob("*/metrics.json"))]

    def output(self, method: str) -> Path:
        """Where training writes its result: `model/` for full fine-tuning, else `adapter/`."""
        return self.model if method == "full" else self.adapter


@dataclass(frozen=True)
class VersionPaths:
    """tuneloop's files beside one registered version."""

    root: Path

    lineage = _child("lineage.json")
    card = _child("README.md")


@dataclass(frozen=True)
class ServePaths:
    """What a gateway keeps between restarts, and the logs of the engine servers it starts."""

    root: Path

    feedback = _child("feedback.jsonl")
    traffic = _child("traffic.jsonl", "Served prompts and answers by response id (`serve.log_traffic`).")
    files = _child("files", "Uploaded files of the OpenAI Files API (metadata + content).")
    batches = _child("batches", "Batch jobs of the OpenAI Batches API.")

    def log(self, process: str) -> Path:
        """The output of a server process the gateway (or the demo) started: `vllm`, `llamacpp`, `demo-gateway`."""
        return self.root / f"{process}.log"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, override: str | Path | None = None) -> Workspace:
        """`override` (the --workspace option) wins over $TUNELOOP_HOME, which wins over ./.tuneloop."""
        chosen = override or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().resolve())

    @staticmethod
    def ensure(path: Path) -> Path:
        """Create a folder (and its parents) and return it."""
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- top-level folders -----------------------------------------------------------------------------------------
    datasets = _child("datasets")
    runs = _child("runs")
    evals = _child("evals")
    models = _child("models")
    exports = _child("exports")
    cache = _child("cache")
    sweeps = _child("sweeps")

    @property
    def serve(self) -> ServePaths:
        return ServePaths(self.root / "serve")

    # -- single files ----------------------------------------------------------------------------------------------
    mlflow_db = _child("mlflow.db")

    def mlflow_artifacts(self, experiment: str) -> Path:
        return self.root / "mlartifacts" / experiment

    registry_lock = _child("registry.lock")
    sweeps_db = _child("sweeps.db")

    def sweep_summary(self, study: str) -> Path:
        return self.sweeps / f"{study}.json"

    # -- per-artifact folders --------------------------------------------------------------------------------------
    def dataset(self, dataset_id: str) -> DatasetPaths:
        return DatasetPaths(self.datasets / dataset_id)

    def dataset_staging(self, dataset_id: str) -> DatasetPaths:
        """Where a dataset is written before it is renamed into place (a crash never leaves half an artifact). The
        host is in the name: nodes sharing a workspace (one PVC, every pod PID 1) must not share a staging folder."""
        return DatasetPaths(self.datasets / f".staging-{dataset_id}-{socket.gethostname()}-{os.getpid()}")

    def run(self, run_id: str) -> RunPaths:
        return RunPaths(self.runs / run_id)

    def run_ids(self) -> list[str]:
        """Every run folder that has a run record (finished or not)."""
        if not self.runs.is_dir():
            return []
        return sorted(path.parent.name for path in self.runs.glob("*/run.json"))

    def latest_finished_run(self) -> str | None:
        """The id of the most recently finished run (its summary written last), or None."""
        finished = [self.run(run_id) for run_id in self.run_ids() if self.run(run_id).summary.exists()]
        if not finished:
            return None
        return max(finished, key=lambda paths: paths.summary.stat().st_mtime).run_id

    def version(self, name: str, version: int) -> VersionPaths:
        """Files of a registered version; `name` is checked not to climb out of the registry folder."""
        folder = self.root / "registry"
        path = folder / name / str(version)
        if not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"invalid model name {name!r}")
        return VersionPaths(path)

    def new_eval(self, labels: str) -> EvalPaths:
        """A new report folder for evaluating models that are not runs (base, folders, registry names)."""
        return _new_eval(self.evals, labels)

    def export_dir(self, reference: str, fmt: str) -> Path:
        return self.exports / f"{_slug(reference)}-{fmt}"

    # -- caches ----------------------------------------------------------------------------------------------------
    def base_model_cache(self, name: str) -> Path:
        """A base model converted to safetensors (a bundled alias, or `keys.gguf_cache_name` of a .gguf file)."""
        return self.models / name

    def builtin_data(self, name: str, generator_version: int, rows: int) -> Path:
        """A generated built-in dataset (`builtin:NAME` sources), once per generator version and row count."""
        return self.cache / f"builtin-{name}-v{generator_version}-{rows}.jsonl"

    @property
    def content_hashes(self) -> Path:
        """Content hashes of big files by path, size and mtime (`keys.tree_sha256`'s memo)."""
        return self.cache / "content-hashes.json"

    def gguf_cache(self, key: str) -> Path:
        """A GGUF conversion (base or LoRA), named by its key from `tuneloop.keys`."""
        return self.cache / "gguf" / key

    def zero_lora_cache(self, key: str) -> Path:
        return self.cache / "vllm-zero-lora" / key

    def registry_download(self, source: str) -> Path:
        """A registry artifact downloaded from a remote MLflow store."""
        return self.cache / "registry-downloads" / _slug(source)[-120:]


def _new_eval(parent: Path, labels: str) -> EvalPaths:
    """`<time>-<labels>`, sortable by time; a second report in the same second gets a suffix instead of mixing."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, number = parent / f"{stamp}-{labels}", 1
    while candidate.exists():
        number += 1
        candidate = parent / f"{stamp}-{labels}-{number}"
    return EvalPaths(candidate)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
