"""`tuneloop eval`: evaluate a model against others (by default its base) on the same rows; gates, report, tracking.

The first model is the evaluated (primary) one; the first compared model is the baseline of gates and deltas. Local
models are loaded one at a time and generate in-process; API models (`openai:`, `url:`) and labels given an endpoint
answer over HTTP, concurrently. Generation runs once per model and feeds every text metric and the LLM judge
(`--judge`); perplexity uses the tokenized validation split (loss tokens only), so it is the same number the
trainer's eval loss gives, and is measured only for local models, as is latency.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from rich.console import Console

from tuneloop import scoring as text_metrics
from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.training import RunRecord
from tuneloop.chat_client import ChatAnswer, ChatEndpoint, Messages
from tuneloop.config import EvalMetric, LoopConfig
from tuneloop.config_file import validate_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.evaluate import safety
from tuneloop.evaluate.budget import GenerationBudget, generation_budget, reference_token_lengths
from tuneloop.evaluate.gates import check_gates
from tuneloop.evaluate.generate import generate, latency, load_for_eval, perplexity
from tuneloop.models import pad_token_id
from tuneloop.registry.refs import ApiModel, ModelSpec, is_api_ref, resolve_api_ref, resolve_eval_model
from tuneloop.workspace import EvalPaths, Workspace

# Every metric group but these two needs the models' generated answers; these two need the weights here.
LOCAL_ONLY_GROUPS = {"perplexity", "latency"}
GENERATION_GROUPS = set(get_args(EvalMetric)) - LOCAL_ONLY_GROUPS
SAFETY_GROUPS = {"safety", "toxicity_rate"}

Subject = ModelSpec | ApiModel
# Serves local models for generation during an evaluation: label -> endpoint (the CLI passes serve.offline's).
LocalEngine = Callable[[list[ModelSpec]], AbstractContextManager[Mapping[str, ChatEndpoint]]]


@dataclass
class EvalRows:
    prompts: list[list[dict[str, str]]]
    references: list[str]
    tokenized: list[dict[str, list[int]]]
    source: str


@dataclass
class ModelOutcome:
    spec: Subject
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    redteam: list[dict[str, Any]] = field(default_factory=list)


def run_evaluation(
    config: LoopConfig,
    workspace: Workspace,
    model_ref: str | None,
    compare_refs: Sequence[str] | str | None = ("base",),
    data_file: Path | None = None,
    limit: int | None = None,
    pairwise: bool = False,
    harness_tasks: list[str] | None = None,
    harness_include: Path | None = None,
    console: Console | None = None,
    judge_ref: str | None = None,
    endpoints: Mapping[str, ChatEndpoint] | None = None,
    local_engine: LocalEngine | None = None,
) -> EvalReport:
    """Evaluate `model_ref` and each of `compare_refs` on the same rows. `judge_ref` (an API model) judges the
    answers; `endpoints` (label -> endpoint) makes those labels' answers come from an engine instead of in-process;
    `local_engine` (given by the CLI, which may start servers) serves the local models for generation while they are
    evaluated: a context manager yielding label -> endpoint for the models it serves (empty: all in-process)."""
    console = console or Console(stderr=True)
    settings = config.eval
    model_ref = model_ref or workspace.latest_finished_run()
    if model_ref is None:
        raise TuneloopError("no model to evaluate", hint="pass --model RUN_ID|base|FOLDER, or train one first")
    subjects = _subjects(model_ref, compare_refs, config, workspace)
    primary = subjects[0]
    judge = _judge_model(judge_ref)
    rows = _eval_rows(config, workspace, data_file, limit or settings.limit, console)
    console.print(
        f"evaluating {', '.join(f'{s.label}={s.ref}' for s in subjects)} on {len(rows.prompts)} rows from {rows.source}"
    )
    groups = set(settings.metrics)
    need_outputs = bool(groups & GENERATION_GROUPS) or judge is not None or pairwise
    prices = _price_table(config) if judge or any(isinstance(s, ApiModel) for s in subjects) else None
    budget = _budget(config, subjects, rows, need_outputs)
    if need_outputs:
        console.print(f"generation budget: {budget.reason}")
    local = [subject for subject in subjects if isinstance(subject, ModelSpec)]
    serving = local_engine(local) if local_engine is not None and local and need_outputs else nullcontext({})
    with serving as served:
        generators = {**served, **(endpoints or {})}
        outcomes = [
            _evaluate_one(
                subject, generators.get(subject.label), rows, groups, need_outputs, config, console, prices, budget
            )
            for subject in subjects
        ]
    for outcome in outcomes:
        if harness_tasks and isinstance(outcome.spec, ModelSpec):
            from tuneloop.evaluate.harness import run_harness

            outcome.metrics.update(run_harness(outcome.spec, harness_tasks, harness_include, limit, console))
    out = _report_dir(workspace, primary, outcomes)
    if outcomes[0].outputs:
        _write_outputs(out, rows, outcomes)
    judge_summary = None
    if judge is not None:
        judge_summary = _judge(judge, out, rows, outcomes, config, console, prices or {})
    baseline = outcomes[1].metrics if len(outcomes) > 1 else None
    significance = _significance(outcomes, rows, groups, config)
    gate_error: ConfigError | None = None
    try:
        gates = check_gates(settings.gates, outcomes[0].metrics, baseline, significance)
    except ConfigError as error:  # a gate this evaluation cannot check: keep the report, then say so
        gates, gate_error = {}, error
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
        outputs=str(out.outputs) if out.outputs.exists() else None,
        judge=judge_summary,
        significance=significance,
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
    if gate_error is not None:
        raise ConfigError(
            f"{gate_error.message} (the evaluation itself is kept: {out.root}; no gate was checked)",
            hint=gate_error.hint,
        )
    _log_to_mlflow(config, workspace, primary, report, out)
    return report


def _subjects(
    model_ref: str, compare_refs: Sequence[str] | str | None, config: LoopConfig, workspace: Workspace
) -> list[Subject]:
    """The primary model, then each compared one (once each, never the primary again), with unique labels."""
    wanted = [compare_refs] if isinstance(compare_refs, str) else list(compare_refs or [])
    refs = list(dict.fromkeys([model_ref, *(ref for ref in wanted if ref and ref != "none")]))
    subjects: list[Subject] = []
    taken: set[str] = set()
    for index, ref in enumerate(refs):
        subject = resolve_eval_model(ref, config, workspace, label="base" if ref == "base" and index else None)
        label, number = subject.label, 1
        while label in taken:
            number += 1
            label = f"{subject.label}-{number}"
        taken.add(label)
        subjects.append(subject if label == subject.label else _relabel(subject, label))
    return subjects


def _relabel(subject: Subject, label: str) -> Subject:
    return replace(subject, label=label)


def _judge_model(judge_ref: str | None) -> ApiModel | None:
    if judge_ref is None:
        return None
    if not is_api_ref(judge_ref):
        raise TuneloopError(
            f"the judge {judge_ref!r} is not an API model reference; the judge answers over an API",
            hint=f"pass --judge openai:MODEL, or serve a local model (`tuneloop serve --model {judge_ref}`) and pass "
            "--judge url:http://127.0.0.1:8000/v1#MODEL",
        )
    return resolve_api_ref(judge_ref, label="judge")


def _price_table(config: LoopConfig) -> dict[str, Any]:
    from tuneloop.prices import load_prices

    return load_prices(config.resolve_path(config.eval.prices) if config.eval.prices else None)


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
    conversations = [json.loads(line) for line in prepared.paths.conversations(split).read_text().splitlines()]
    tokenized = prepared.read_table(split, columns=["input_ids", "labels"]).to_pylist()
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
    subject: Subject,
    endpoint: ChatEndpoint | None,
    rows: EvalRows,
    groups: set[str],
    need_outputs: bool,
    config: LoopConfig,
    console: Console,
    prices: dict[str, Any] | None,
    budget: GenerationBudget,
) -> ModelOutcome:
    started = time.perf_counter()
    if isinstance(subject, ApiModel):
        outcome = _evaluate_over_api(
            subject, subject.endpoint, rows, groups, need_outputs, config, console, prices, budget
        )
        skipped = sorted(groups & LOCAL_ONLY_GROUPS)
        if skipped:
            outcome.details.setdefault("notes", []).append(
                f"{' and '.join(skipped)} not measured: an API model's weights are not on this machine"
            )
    elif endpoint is not None:
        outcome = _evaluate_over_api(subject, endpoint, rows, groups, need_outputs, config, console, None, budget)
        parity_rows = min(config.eval.parity_rows, len(outcome.outputs))
        if groups & LOCAL_ONLY_GROUPS or parity_rows:
            # In-process on a sample too: are the engine's greedy answers the ones the model gives here?
            outcome = _evaluate_in_process(
                subject, rows, groups & LOCAL_ONLY_GROUPS, False, config, console, outcome, budget, parity_rows
            )
    else:
        outcome = _evaluate_in_process(
            subject, rows, groups, need_outputs, config, console, ModelOutcome(subject), budget
        )
    outcome.details["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


def _evaluate_in_process(
    spec: ModelSpec,
    rows: EvalRows,
    groups: set[str],
    need_outputs: bool,
    config: LoopConfig,
    console: Console,
    outcome: ModelOutcome,
    budget: GenerationBudget,
    parity_rows: int = 0,
) -> ModelOutcome:
    from tuneloop.device import resolve_precision

    settings = config.eval
    precision = resolve_precision(settings.precision)
    model, tokenizer = load_for_eval(spec, precision.torch_dtype)
    if "perplexity" in groups:
        with console.status(f"[{spec.label}] perplexity"):
            outcome.metrics.update(perplexity(model, rows.tokenized, pad_token_id(tokenizer), settings.batch_size))
    if need_outputs:
        from rich.progress import Progress

        with Progress(console=console) as progress:
            task = progress.add_task(f"[{spec.label}] generate", total=len(rows.prompts))
            generations = generate(
                model,
                tokenizer,
                rows.prompts,
                budget.max_new_tokens,
                settings.batch_size,
                progress=lambda done: progress.advance(task, done),
                stop=budget.stop,
            )
        outcome.outputs = [g.text for g in generations]
        outcome.output_lengths = [g.new_tokens for g in generations]
        _text_metrics(outcome, generations, rows.references, groups, config)
    if groups & SAFETY_GROUPS:

        def answer(prompts: list[Messages], max_new_tokens: int) -> list[str]:
            return [g.text for g in generate(model, tokenizer, prompts, max_new_tokens, settings.batch_size)]

        with console.status(f"[{spec.label}] red-team prompts"):
            _red_team(outcome, answer, config)
    if parity_rows:
        from tuneloop.evaluate.parity import parity

        # Rows spread over the whole set: near-ties that flip between generators are not where the data starts.
        sample = sorted({round(i * (len(rows.prompts) - 1) / max(parity_rows - 1, 1)) for i in range(parity_rows)})
        with console.status(f"[{spec.label}] parity: {len(sample)} rows in-process"):
            here = generate(
                model,
                tokenizer,
                [rows.prompts[index] for index in sample],
                budget.max_new_tokens,
                settings.batch_size,
                stop=budget.stop,
            )
        report = parity([g.text for g in here], [outcome.outputs[index] for index in sample])
        for difference in report["differences"]:
            difference["row"] = sample[difference["row"]]
        outcome.details["parity"] = {**report, "sample": sample}
        console.print(
            f"[{spec.label}] engine vs in-process: {report['equal_share']:.0%} of {len(sample)} greedy answers identical"
        )
    if "latency" in groups:
        with console.status(f"[{spec.label}] latency"):
            outcome.metrics.update(latency(model, tokenizer, rows.prompts[:3]))
    outcome.details["precision"] = precision.name
    return outcome  # the model is freed here, before the next one loads


def _evaluate_over_api(
    subject: Subject,
    endpoint: ChatEndpoint,
    rows: EvalRows,
    groups: set[str],
    need_outputs: bool,
    config: LoopConfig,
    console: Console,
    prices: dict[str, Any] | None,
    budget: GenerationBudget,
) -> ModelOutcome:
    """Answers from `endpoint` (concurrent, greedy); text metrics, red-team prompts and, for API models, the cost."""
    from tuneloop.chat_client import chat_generate
    from tuneloop.evaluate.api_models import answer_over_api, answers_cost, usage_details

    settings = config.eval
    outcome = ModelOutcome(subject)
    answered: list[ChatAnswer] = []
    if need_outputs:
        answers = answer_over_api(
            endpoint,
            rows.prompts,
            budget.max_new_tokens,
            settings.api_concurrency,
            console,
            f"[{subject.label}] generate ({endpoint.describe()})",
            stop=budget.stop,
        )
        answered += answers
        outcome.outputs = [answer.text for answer in answers]
        outcome.output_lengths = [answer.new_tokens for answer in answers]
        _text_metrics(outcome, answers, rows.references, groups, config)
    if groups & SAFETY_GROUPS:

        def answer(prompts: list[Messages], max_new_tokens: int) -> list[str]:
            replies = chat_generate(endpoint, prompts, max_new_tokens, concurrency=settings.api_concurrency)
            answered.extend(replies)
            return [reply.text for reply in replies]

        with console.status(f"[{subject.label}] red-team prompts"):
            _red_team(outcome, answer, config)
    outcome.details["endpoint"] = endpoint.describe()
    outcome.details["usage"] = usage_details(answered)
    if isinstance(subject, ApiModel) and prices is not None:
        from tuneloop.prices import api_price

        usd, note = answers_cost(api_price(prices, subject.price_names), answered, subject.price_names)
        if usd is not None:
            outcome.metrics["eval_cost_usd"] = usd
        outcome.details["cost"] = note
    return outcome


def _budget(config: LoopConfig, subjects: list[Subject], rows: EvalRows, need_outputs: bool) -> GenerationBudget:
    """One budget for every model (their answers compare), sized in the first local model's tokens; with API models
    only, in ~4 characters per token. The references are tokenized only when the auto budget will be used."""
    if not need_outputs:
        return GenerationBudget(config.eval.max_new_tokens, [], "nothing is generated")
    local = next((subject for subject in subjects if isinstance(subject, ModelSpec)), None)
    if config.eval.answer_budget == "fixed":
        lengths: list[int] = []  # the fixed budget does not read them
    elif local is not None:
        from tuneloop.models import load_saved_tokenizer

        tokenizer = load_saved_tokenizer(local.tokenizer_folder, local.trust_remote_code)
        lengths = reference_token_lengths(tokenizer, rows.references)
    else:
        lengths = [len(reference) // 4 + 1 for reference in rows.references]
    return generation_budget(config.eval, rows.references, lengths)


def _red_team(outcome: ModelOutcome, answer: safety.Answerer, config: LoopConfig) -> None:
    metrics, rows = safety.run_red_team(answer, config.eval)
    outcome.metrics.update(metrics)
    outcome.redteam = rows


def _write_outputs(out: EvalPaths, rows: EvalRows, outcomes: list[ModelOutcome]) -> None:
    """outputs.jsonl: every evaluated row with each model's answer (what /dashboard/rate shows raters)."""
    with out.outputs.open("w", encoding="utf-8") as handle:
        for index, (messages, reference) in enumerate(zip(rows.prompts, rows.references, strict=True)):
            line = {
                "id": _row_id(index),
                "prompt": _last_user_message(messages),
                "messages": messages,
                "reference": reference,
                "outputs": {outcome.spec.label: outcome.outputs[index] for outcome in outcomes if outcome.outputs},
            }
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def _row_id(index: int) -> str:
    return f"r{index:04d}"


def _last_user_message(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def _question_text(messages: list[dict[str, str]]) -> str:
    """The question as the judge sees it: the user's message, or the whole conversation when there is more."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _judge(
    judge: ApiModel,
    out: EvalPaths,
    rows: EvalRows,
    outcomes: list[ModelOutcome],
    config: LoopConfig,
    console: Console,
    prices: dict[str, Any],
) -> dict[str, Any]:
    """LLM-as-judge over the models' answers: metrics into each judged model, every verdict into judge.jsonl."""
    from tuneloop.evaluate.judge import JudgedRow, run_judge
    from tuneloop.prices import api_price

    settings = config.eval
    judged = [outcome for outcome in outcomes if outcome.outputs]
    labels = [outcome.spec.label for outcome in judged]
    judged_rows = [
        JudgedRow(_row_id(index), _question_text(messages), reference or None)
        for index, (messages, reference) in enumerate(zip(rows.prompts, rows.references, strict=True))
    ]
    result = run_judge(
        judge.endpoint,
        judged_rows,
        {outcome.spec.label: outcome.outputs for outcome in judged},
        labels[0],
        labels[1:],
        settings.rubric,
        settings.judge_modes,
        settings.judge_max_new_tokens,
        settings.api_concurrency,
        console,
    )
    with out.judge.open("w", encoding="utf-8") as handle:
        for record in result.records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    for outcome in judged:
        outcome.metrics.update(result.metrics.get(outcome.spec.label, {}))
    summary = {**result.summary, "file": str(out.judge), "modes": list(settings.judge_modes)}
    price = api_price(prices, judge.price_names)
    if price is not None:
        summary["cost_usd"] = price.cost(summary["prompt_tokens"], summary["completion_tokens"])
    return summary


def _significance(
    outcomes: list[ModelOutcome], rows: EvalRows, groups: set[str], config: LoopConfig
) -> dict[str, dict[str, Any]] | None:
    """Whether the evaluated model's difference from the baseline is real, per text metric: paired tests on the
    per-row scores of the same rows (McNemar for exact match and accuracy, the paired bootstrap for the rest)."""
    if len(outcomes) < 2 or not outcomes[0].outputs or not outcomes[1].outputs:
        return None
    from tuneloop.stats import paired_comparison

    settings = config.eval
    scores = [
        text_metrics.per_row_scores(outcome.outputs, rows.references, groups, settings.labels, settings.answer_regex)
        for outcome in outcomes[:2]
    ]
    return paired_comparison(scores[0], scores[1], seed=config.project.seed) or None


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
    if groups & SAFETY_GROUPS:
        outcome.metrics.update(safety.output_safety(outputs, settings))
    if "generation_stats" in groups:
        outcome.metrics.update(
            text_metrics.generation_stats(outcome.output_lengths, outputs, [g.hit_max_tokens for g in generations])
        )


def _report_dir(workspace: Workspace, primary: Subject, outcomes: list[ModelOutcome]) -> EvalPaths:
    """A run's reports go into its `eval/`; other models' into the workspace's `evals/`."""
    labels = re.sub(r"[^A-Za-z0-9._-]+", "-", "-vs-".join(outcome.spec.label for outcome in outcomes))[:80]
    run = primary.run if isinstance(primary, ModelSpec) else None
    report = run.new_eval(labels) if run else workspace.new_eval(labels)
    workspace.ensure(report.root)
    return report


def _log_to_mlflow(
    config: LoopConfig, workspace: Workspace, primary: Subject, report: EvalReport, out: EvalPaths
) -> None:
    """Metrics, gate results and the report into the evaluated run's MLflow run, when it has one."""
    if not isinstance(primary, ModelSpec) or primary.run is None or not primary.run.record.exists():
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
