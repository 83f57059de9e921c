"""`tuneloop eval`: evaluate a model (and, by default, its base) on the same rows; gates, report, tracking.

One model is loaded at a time. Generation runs once per model and feeds every text metric; perplexity uses the
tokenized validation split (loss tokens only), so it is the same number the trainer's eval loss gives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from rich.console import Console

from tuneloop import scoring as text_metrics
from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.training import RunRecord
from tuneloop.config import EvalMetric, LoopConfig
from tuneloop.config_file import validate_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import safety
from tuneloop.evaluate.gates import check_gates
from tuneloop.evaluate.generate import generate, latency, load_for_eval, perplexity
from tuneloop.models import pad_token_id
from tuneloop.registry.refs import ModelSpec, resolve_model_ref
from tuneloop.workspace import EvalPaths, Workspace

# Every metric group but these two needs the models' generated answers.
GENERATION_GROUPS = set(get_args(EvalMetric)) - {"perplexity", "latency"}


@dataclass
class EvalRows:
    prompts: list[list[dict[str, str]]]
    references: list[str]
    tokenized: list[dict[str, list[int]]]
    source: str


@dataclass
class ModelOutcome:
    spec: ModelSpec
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    redteam: list[dict[str, Any]] = field(default_factory=list)


def run_evaluation(
    config: LoopConfig,
    workspace: Workspace,
    model_ref: str | None,
    compare_ref: str | None = "base",
    data_file: Path | None = None,
    limit: int | None = None,
    pairwise: bool = False,
    harness_tasks: list[str] | None = None,
    harness_include: Path | None = None,
    console: Console | None = None,
) -> EvalReport:
    console = console or Console(stderr=True)
    settings = config.eval
    model_ref = model_ref or workspace.latest_finished_run()
    if model_ref is None:
        raise TuneloopError("no model to evaluate", hint="pass --model RUN_ID|base|FOLDER, or train one first")
    primary = resolve_model_ref(model_ref, config, workspace)
    specs = [primary]
    if compare_ref and compare_ref != model_ref:
        specs.append(resolve_model_ref(compare_ref, config, workspace, label="base" if compare_ref == "base" else None))
    rows = _eval_rows(config, workspace, data_file, limit or settings.limit, console)
    console.print(
        f"evaluating {', '.join(f'{s.label}={s.ref}' for s in specs)} on {len(rows.prompts)} rows from {rows.source}"
    )
    groups = set(settings.metrics)
    outcomes = [_evaluate_one(spec, rows, groups, config, console) for spec in specs]
    for outcome in outcomes:
        if harness_tasks:
            from tuneloop.evaluate.harness import run_harness

            outcome.metrics.update(run_harness(outcome.spec, harness_tasks, harness_include, limit, console))
    baseline = outcomes[1].metrics if len(outcomes) > 1 else None
    gates = check_gates(settings.gates, outcomes[0].metrics, baseline)
    out = _report_dir(workspace, primary, outcomes)
    report = EvalReport(
        models={outcome.spec.label: outcome.spec.ref for outcome in outcomes},
        metrics={outcome.spec.label: outcome.metrics for outcome in outcomes},
        details={outcome.spec.label: outcome.details for outcome in outcomes},
        gates={gate: result["result"] for gate, result in gates.items()},
        gate_details=gates,
        passed=all(result["result"] == "pass" for result in gates.values()),
        rows=len(rows.prompts),
        data=rows.source,
        report=str(out.report_html),
        dir=str(out.root),
    )
    if pairwise and len(outcomes) > 1 and outcomes[0].outputs:
        from tuneloop.evaluate.pairwise import write_sheet

        prompts = [messages[-1]["content"] for messages in rows.prompts]
        paths = write_sheet(
            out,
            prompts,
            outcomes[0].outputs,
            outcomes[1].outputs,
            (outcomes[0].spec.label, outcomes[1].spec.label),
            seed=config.project.seed,
        )
        report.pairwise = {name: str(path) for name, path in paths.items()}
    from tuneloop.evaluate.report import write_eval_report

    write_eval_report(out, report, outcomes, rows, settings.samples_in_report)
    report.save(out.metrics)
    _log_to_mlflow(config, workspace, primary, report, out)
    return report


def _eval_rows(
    config: LoopConfig, workspace: Workspace, data_file: Path | None, limit: int | None, console: Console
) -> EvalRows:
    source = config.eval.data.model_dump(mode="json") if config.eval.data else None
    if data_file is not None:
        source = {**(source or {}), "path": str(data_file.resolve())}
    elif source is not None:
        source["path"] = str(config.resolve_path(source["path"]))
    if source is not None:
        raw = config.model_dump(mode="json")
        raw["data"]["sources"] = [source]
        raw["data"].update({"val_fraction": 0.0, "packing": False, "truncation": True})
        raw["data"]["filters"] = {
            "min_tokens": 1,
            "exact_duplicates": False,
            "near_duplicates": {"enabled": False},
            "toxicity": {"enabled": False},
        }
        eval_config = validate_config(raw, source=f"eval data {source['path']}")
        eval_config._config_dir = config._config_dir
        prepared = prepare_dataset(eval_config, workspace, console=console)
        return _load_rows(prepared, "train", limit, label=source["path"])
    prepared = prepare_dataset(config, workspace, console=console)
    if not prepared.has_validation:
        raise TuneloopError("the prepared dataset has no validation split", hint="set data.val_fraction or --data")
    return _load_rows(prepared, "val", limit)


def _load_rows(prepared: PreparedDataset, split: str, limit: int | None, label: str | None = None) -> EvalRows:
    import pyarrow.parquet as pq

    conversations = [json.loads(line) for line in prepared.paths.conversations(split).read_text().splitlines()]
    tokenized = pq.read_table(prepared.paths.parquet(split), columns=["input_ids", "labels"]).to_pylist()
    prompts, references, kept = [], [], []
    for conversation, row in zip(conversations, tokenized, strict=True):
        messages = conversation["messages"]
        if conversation["kind"] != "chat" or messages[-1]["role"] != "assistant":
            continue
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
        kept.append(row)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise TuneloopError(f"no chat rows with an assistant answer in {prepared.paths.conversations(split)}")
    return EvalRows(prompts, references, kept, label or f"{prepared.dataset_id}/{split}")


def _evaluate_one(
    spec: ModelSpec, rows: EvalRows, groups: set[str], config: LoopConfig, console: Console
) -> ModelOutcome:
    from tuneloop.device import resolve_precision

    settings = config.eval
    precision = resolve_precision(settings.precision)
    started = time.perf_counter()
    model, tokenizer = load_for_eval(spec, precision.torch_dtype)
    outcome = ModelOutcome(spec)
    if "perplexity" in groups:
        with console.status(f"[{spec.label}] perplexity"):
            outcome.metrics.update(perplexity(model, rows.tokenized, pad_token_id(tokenizer), settings.batch_size))
    if groups & GENERATION_GROUPS:
        from rich.progress import Progress

        with Progress(console=console) as progress:
            task = progress.add_task(f"[{spec.label}] generate", total=len(rows.prompts))
            generations = generate(
                model,
                tokenizer,
                rows.prompts,
                settings.max_new_tokens,
                settings.batch_size,
                progress=lambda done: progress.advance(task, done),
            )
        outcome.outputs = [g.text for g in generations]
        outcome.output_lengths = [g.new_tokens for g in generations]
        _text_metrics(outcome, generations, rows.references, groups, config)
    if groups & {"safety", "toxicity_rate"}:
        with console.status(f"[{spec.label}] red-team prompts"):
            answers = generate(
                model,
                tokenizer,
                [[{"role": "user", "content": p}] for p in safety.RED_TEAM_PROMPTS],
                min(settings.max_new_tokens, 96),
                settings.batch_size,
            )
        scores = safety.toxicity_scores([a.text for a in answers])
        outcome.redteam = [
            {"prompt": p, "answer": a.text, "refusal": safety.is_refusal(a.text), "toxicity": s}
            for p, a, s in zip(safety.RED_TEAM_PROMPTS, answers, scores, strict=True)
        ]
        outcome.metrics["redteam_refusal_rate"] = sum(r["refusal"] for r in outcome.redteam) / len(outcome.redteam)
        outcome.metrics["redteam_toxic_rate"] = sum(
            r["toxicity"] >= settings.toxicity_threshold for r in outcome.redteam
        ) / len(outcome.redteam)
    if "latency" in groups:
        with console.status(f"[{spec.label}] latency"):
            outcome.metrics.update(latency(model, tokenizer, rows.prompts[:3]))
    outcome.details["precision"] = precision.name
    outcome.details["seconds"] = round(time.perf_counter() - started, 1)
    del model
    return outcome


def _text_metrics(
    outcome: ModelOutcome, generations: list[Any], references: list[str], groups: set[str], config: LoopConfig
) -> None:
    settings = config.eval
    outputs = outcome.outputs
    if "bleu" in groups:
        outcome.metrics["bleu"] = text_metrics.bleu(outputs, references)
    if groups & {"rouge", "rouge_l"}:
        outcome.metrics.update(text_metrics.rouge(outputs, references))
    if "exact_match" in groups:
        outcome.metrics["exact_match"] = text_metrics.exact_match(outputs, references, settings.answer_regex)
    if "accuracy" in groups:
        result = text_metrics.classification(outputs, references, settings.labels, settings.answer_regex)
        outcome.metrics["accuracy"] = result.pop("accuracy")
        if "unparsed_rate" in result:
            outcome.metrics["unparsed_rate"] = result.pop("unparsed_rate")
        outcome.details["classification"] = result
    if groups & {"safety", "toxicity_rate"}:
        outcome.metrics["toxicity_rate"] = safety.toxicity_rate(outputs, settings.toxicity_threshold)
    if "generation_stats" in groups:
        outcome.metrics.update(
            text_metrics.generation_stats(outcome.output_lengths, outputs, [g.hit_max_tokens for g in generations])
        )


def _report_dir(workspace: Workspace, primary: ModelSpec, outcomes: list[ModelOutcome]) -> EvalPaths:
    """A run's reports go into its `eval/`; other models' into the workspace's `evals/`."""
    labels = "-vs-".join(outcome.spec.label for outcome in outcomes)
    report = primary.run.new_eval(labels) if primary.run else workspace.new_eval(labels)
    workspace.ensure(report.root)
    return report


def _log_to_mlflow(
    config: LoopConfig, workspace: Workspace, primary: ModelSpec, report: EvalReport, out: EvalPaths
) -> None:
    """Metrics, gate results and the report into the evaluated run's MLflow run, when it has one."""
    if primary.run is None or not primary.run.record.exists():
        return
    mlflow_run_id = RunRecord.load(primary.run.record).mlflow_run_id
    if not mlflow_run_id:
        return
    from tuneloop.tracking import Tracker

    tracker = Tracker.open(workspace, config.registry.tracking_uri, config.project.name)
    tracker.log_metrics(
        mlflow_run_id,
        {f"eval.{label}.{name}": value for label, values in report.metrics.items() for name, value in values.items()},
    )
    tracker.set_tags(mlflow_run_id, {f"tuneloop.gate.{gate}": result for gate, result in report.gates.items()})
    tracker.log_artifacts(mlflow_run_id, [out.root], under=f"eval/{out.root.name}")
