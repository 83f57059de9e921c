"""`tuneloop train`: the recipe. Prepared data + base model + PEFT adapter (or full weights) -> Transformers Trainer.

Thin wiring over the libraries that do the work: Transformers' Trainer (loop, schedules, checkpoints, exact resume,
DDP through Accelerate), PEFT (LoRA/DoRA/rsLoRA), bitsandbytes (NF4). tuneloop adds the choices that make it fast and
safe on the machine at hand (packing, precision, the 4-bit CPU fix, the memory preflight) and the bookkeeping
(run folder, MLflow, summary). `train_model` reads top to bottom; `_setup_model`, `_setup_data` and
`_setup_callbacks` take only their own section (the run's setup and tracking need the whole config: they log it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.artifacts.training import RunRecord, TrainResult
from tuneloop.config import PREFERENCE_METHODS, DataConfig, LoopConfig, TrainConfig, flatten
from tuneloop.data.prepare import prepare_dataset
from tuneloop.device import (
    Precision,
    has_gpu,
    memory_per_process_mb,
    peak_memory_mb,
    resolve_precision,
    settle_deepspeed_accelerator,
    training_threads,
)
from tuneloop.error_reporting import reported_failures, set_error_context
from tuneloop.errors import TuneloopError
from tuneloop.models import (
    BaseModelRef,
    base_weights_fingerprint,
    configured_base,
    load_model,
    load_tokenizer,
    pad_token_id,
)
from tuneloop.train.compile import compile_decision, compile_decoder_layers
from tuneloop.train.memory import MemoryEstimate, estimate_memory, preflight
from tuneloop.train.runs import open_run
from tuneloop.train.schedule import Schedule, plan_schedule
from tuneloop.train.strategies import check_strategy, shards_4bit_weights, trainer_arguments, uses_tuneloop_fsdp
from tuneloop.workspace import RunPaths, Workspace


@dataclass
class _Run:
    """One training run: where it writes, what it resumes, on which base, in which precision."""

    record: RunRecord
    paths: RunPaths
    checkpoint: Path | None
    base: BaseModelRef
    base_weights: str
    precision: Precision
    quantization: str | None
    estimate: MemoryEstimate
    compile: bool
    threads: int
    parent: Any = None  # preference tuning: the `train.preference.Parent` it starts from


def _quiet() -> Console:
    return Console(stderr=True, quiet=True)


def is_main_process() -> bool:
    return global_rank() == 0


# Where this process sits in a torchrun job (its environment; a plain process is rank 0 of 1).
def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def train_model(
    config: LoopConfig,
    workspace: Workspace,
    *,
    resume: bool = False,
    run_id: str | None = None,
    callbacks: Sequence[Any] = (),
    console: Console | None = None,
    prepared: PreparedDataset | None = None,
) -> TrainResult:
    """Train per `config.train`; with `resume`, continue the newest unfinished run of the same config. A failure is
    reported to Sentry (with the run id, model, method and step) when `train.sentry_dsn` or $SENTRY_DSN is set."""
    with reported_failures(config.train.sentry_dsn, "train"):
        return _train(
            config, workspace, resume=resume, run_id=run_id, callbacks=callbacks, console=console, prepared=prepared
        )


def _train(
    config: LoopConfig,
    workspace: Workspace,
    *,
    resume: bool,
    run_id: str | None,
    callbacks: Sequence[Any],
    console: Console | None,
    prepared: PreparedDataset | None,
) -> TrainResult:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    prepared = prepared or prepare_dataset(config, workspace, console=console if is_main_process() else _quiet())
    run = _setup_run(config, workspace, prepared, resume, run_id, console)
    set_error_context(run_id=run.record.run_id, model=config.model.base, method=config.train.method, rank=global_rank())
    tokenizer = load_tokenizer(run.base, config.chat_template_spec())
    preference = config.train.method in PREFERENCE_METHODS  # DPO/ORPO: model, data and trainer from preference.py
    if preference:
        from tuneloop.train import preference as pref
        from tuneloop.train.inputs import TokenCounter

        model, model_memory_mb, peft_config = pref.setup_model(
            config.train, run.base, run.precision, run.threads, run.parent
        )
        train_data, val_data = pref.load_splits(prepared)
        counter = TokenCounter()
    else:
        model, model_memory_mb = _setup_model(config.train, run.base, run.precision, run.compile, run.threads)
        train_data, val_data, collator = _setup_data(config.data, prepared, pad_token_id(tokenizer))
        counter = collator.counter
    schedule = plan_schedule(config.train, len(train_data), world_size())
    if is_main_process():
        console.print(f"schedule: {schedule.describe()}")
    tracker = _setup_tracking(config, workspace, run, prepared) if _tracks_mlflow(config.train) else None
    from tuneloop.train.callbacks import RichProgressCallback, ThroughputCallback

    throughput = ThroughputCallback(counter)
    progress = RichProgressCallback(console, throughput)
    chosen_callbacks = _setup_callbacks(config.train, throughput, progress, val_data is not None, tracker, callbacks)
    if preference:
        arguments = partial(_training_arguments, config.train, schedule, run.paths, run.precision, val_data is not None)
        trainer = pref.setup_trainer(
            config, arguments, model, peft_config, tokenizer, train_data, val_data, chosen_callbacks, counter
        )
        model = trainer.model  # TRL wraps the base in the new adapter
    else:
        # eval.labels / eval.answer_regex say how an answer is read (for accuracy and exact match) in training too.
        task_metrics = _setup_task_metrics(
            config.train, prepared, tokenizer, config.eval.labels, config.eval.answer_regex, progress
        )
        trainer = _setup_trainer(
            config.train, schedule, model, run, train_data, val_data, collator, chosen_callbacks, task_metrics
        )
    if is_main_process():
        run.record.save(run.paths.record)
    try:
        trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    except BaseException:
        set_error_context(step=trainer.state.global_step)
        if is_main_process():
            _mark_failed(run, tracker)
        raise
    if is_main_process() and config.train.keep_best and trainer.state.best_global_step:
        console.print(
            f"keep-best: step {trainer.state.best_global_step} "
            f"({config.train.metric_for_best} {trainer.state.best_metric:.4f})"
        )
    return _finalize(config, trainer, model, tokenizer, run, prepared, throughput, tracker, started, model_memory_mb)


def _setup_run(
    config: LoopConfig,
    workspace: Workspace,
    prepared: PreparedDataset,
    resume: bool,
    run_id: str | None,
    console: Console,
) -> _Run:
    """Precision, 4-bit backend, memory preflight and the run folder, before anything heavy is loaded."""
    settle_deepspeed_accelerator()
    settings = config.train
    precision = resolve_precision(settings.precision)
    quantization = None
    if settings.method == "qlora" or (settings.method in PREFERENCE_METHODS and settings.preference.quantize):
        from tuneloop.train.quant import require_four_bit_backend

        quantization = require_four_bit_backend().describe()
    base = configured_base(config, workspace)
    base_weights = base_weights_fingerprint(base, workspace.content_hashes)
    quiet = not is_main_process()
    for note in check_strategy(settings, world_size(), has_gpu()):
        if not quiet:
            console.print(f"[yellow]note:[/] {note}")
    estimate = estimate_for(config, base, prepared, precision.name, world_size())
    available = memory_per_process_mb(local_world_size())
    warning = preflight(estimate, available, settings.preflight, host_offload=not has_gpu())
    if warning and not quiet:
        console.print(f"[yellow]warning:[/] {warning}")
    parent = None
    if settings.method in PREFERENCE_METHODS:
        from tuneloop.train.preference import describe, resolve_parent

        parent = resolve_parent(config, workspace, base_weights)
        if not quiet:
            console.print(describe(settings, parent))
    record, checkpoint = open_run(config, workspace, base_weights, prepared.dataset_id, resume, run_id, console)
    compiled, compile_reason = compile_decision(settings, has_gpu(), world_size())
    if settings.method in PREFERENCE_METHODS:
        compiled, compile_reason = False, "TRL's preference trainers run their own forward"
    threads = training_threads(settings.num_threads, local_world_size())
    if not quiet:
        console.print(
            f"run [bold]{record.run_id}[/]: {settings.method} on {config.model.base}, precision {precision.name} "
            f"({precision.reason})"
            + (f", 4-bit backend: {quantization}" if quantization else "")
            + f", compile {'on' if compiled else 'off'} ({compile_reason}), "
            + f"{threads} threads"
            + (f", resuming from {checkpoint.name}" if checkpoint else "")
        )
    paths = workspace.run(record.run_id)
    return _Run(
        record, paths, checkpoint, base, base_weights, precision, quantization, estimate, compiled, threads, parent
    )


def estimate_for(
    config: LoopConfig, base: BaseModelRef, prepared: PreparedDataset | None, precision: str, world: int
) -> MemoryEstimate:
    """One rank's memory for this config on `world` processes (the prepared data gives the row lengths when it does
    not pack; without it, `data.max_seq_len` is assumed)."""
    from transformers import AutoConfig

    settings = config.train
    if prepared is None:
        seq_len = config.data.max_seq_len
    elif config.data.packing:
        seq_len = prepared.manifest.packing.length or config.data.max_seq_len
    else:
        seq_len = max(prepared.manifest.tokens.p95, 1)
    method, batch_size = settings.method, settings.batch_size
    if method in PREFERENCE_METHODS:  # an adapter whose batches hold each pair's two answers
        method, batch_size = ("qlora" if settings.preference.quantize else "lora"), batch_size * 2
    return estimate_memory(
        AutoConfig.from_pretrained(base.source, trust_remote_code=base.trust_remote_code),
        method,
        settings.lora.r,
        batch_size,
        seq_len,
        precision,
        settings.gradient_checkpointing,
        strategy=settings.distributed.strategy,
        world_size=world,
        cpu_offload=settings.distributed.cpu_offload,
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _setup_model(
    settings: TrainConfig, base: BaseModelRef, precision: Precision, compile_layers: bool, threads: int
) -> tuple[Any, float]:
    """The base model for `settings.method` (4-bit for QLoRA, 16-bit frozen base for LoRA where fast) with a new
    LoRA adapter on it (its decoder layers compiled when `compile_layers`), trained on `threads` CPU threads, and the
    base weights' memory footprint in MiB."""
    import torch
    from transformers import set_seed

    torch.set_num_threads(threads)
    set_seed(settings.seed)
    model = load_base_for_training(
        base, settings.method, precision, settings.gradient_checkpointing, shards_4bit_weights(settings)
    )
    model_memory_mb = round(model.get_memory_footprint() / 2**20, 1)
    if settings.method in ("lora", "qlora"):
        from peft import get_peft_model

        from tuneloop.train.lora import peft_lora_config

        model = get_peft_model(model, peft_lora_config(settings.lora, model))
    if compile_layers:
        compile_decoder_layers(model)
    return model, model_memory_mb


def load_base_for_training(
    base: BaseModelRef, method: str, precision: Precision, gradient_checkpointing: bool, shardable_4bit: bool = False
) -> Any:
    kwargs: dict[str, Any] = {}
    if method == "qlora":
        import torch

        from tuneloop.train.quant import nf4_config

        compute = precision.torch_dtype if precision.name != "fp32" else torch.float32
        kwargs = {"quantization_config": nf4_config(compute, shardable_4bit), "dtype": compute}
    elif method == "lora" and precision.name in ("bf16", "fp16"):
        # A frozen base needs no fp32 master copy: 16-bit base weights halve memory and run faster; PEFT keeps
        # the adapter weights in fp32.
        kwargs["dtype"] = precision.torch_dtype
    model = load_model(base, **kwargs)
    model.config.use_cache = False  # also required for contamination-free packing (restarting position ids)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        from tuneloop.train.quant import disable_cpu_inference_repack

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        disable_cpu_inference_repack(model)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()
    return model


def _setup_data(settings: DataConfig, prepared: PreparedDataset, pad_id: int) -> tuple[Any, Any | None, Any]:
    """Train and validation splits and the collator (packed or padded per `data.packing`) that counts tokens."""
    from tuneloop.train.inputs import CountingCollator, TokenCounter, load_splits

    train_data, val_data = load_splits(prepared)
    length = prepared.manifest.packing.length if settings.packing else None
    return train_data, val_data, CountingCollator(settings.packing, pad_id, TokenCounter(), length)


def _setup_task_metrics(
    settings: TrainConfig,
    prepared: PreparedDataset,
    tokenizer: Any,
    labels: list[str] | None,
    answer_regex: str | None,
    progress: Any,
) -> Any:
    """`train.eval_generate`'s rows and scorer (None when it is off); `labels`/`answer_regex` read the answers."""
    if settings.eval_generate is None:
        return None
    from tuneloop.train.eval_generate import TaskMetrics, load_generation_rows

    rows = load_generation_rows(prepared, settings.eval_generate.rows)
    return TaskMetrics(settings.eval_generate, tokenizer, rows, labels, answer_regex, progress.generation_bar)


def _setup_callbacks(
    settings: TrainConfig,
    throughput: Any,
    progress: Any,
    has_val: bool,
    tracker: Any,
    extra: Sequence[Any],
) -> list[Any]:
    chosen: list[Any] = [throughput, progress, *extra]
    if settings.early_stopping_patience and has_val:
        from transformers import EarlyStoppingCallback

        chosen.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    if tracker is not None:
        chosen.append(tracker)
    return chosen


def _tracks_mlflow(settings: TrainConfig) -> bool:
    return "mlflow" in settings.report_to and is_main_process()


def _setup_tracking(config: LoopConfig, workspace: Workspace, run: _Run, prepared: PreparedDataset) -> Any:
    """The MLflow run (a resumed run reopens its first attempt's) and the callback that logs into it."""
    from tuneloop.tracking import Tracker
    from tuneloop.train.callbacks import MlflowCallback

    tracker = Tracker.open(workspace, config.registry.tracking_uri, config.project.name)
    if run.record.mlflow_run_id is not None:
        tracker.reopen_run(run.record.mlflow_run_id)
        return MlflowCallback(tracker, run.record.mlflow_run_id, config.train.system_metrics, resumed=True)
    data = config.section_dump("data")
    params = flatten(
        {
            "train": config.section_dump("train"),
            "model": config.section_dump("model"),
            "data": {key: value for key, value in data.items() if key != "sources"},
        }
    )
    params["data.sources"] = str([source["path"] for source in data["sources"]])
    params["data.source_sha256"] = str(prepared.manifest.source_hashes)
    tags = {
        "tuneloop.run_id": run.record.run_id,
        "tuneloop.dataset_id": prepared.dataset_id,
        "tuneloop.data_fingerprint": prepared.dataset_id,
        "tuneloop.base_model": config.model.base,
        "tuneloop.method": config.train.method,
        "tuneloop.precision": run.precision.name,
        "tuneloop.quantization": run.quantization or "none",
    }
    if run.parent is not None:
        tags["tuneloop.parent"] = run.parent.run_id or run.parent.reference
    run.record.mlflow_run_id = tracker.start_run(run.record.run_id, params, tags)
    return MlflowCallback(tracker, run.record.mlflow_run_id, config.train.system_metrics)


def _setup_trainer(
    settings: TrainConfig,
    schedule: Schedule,
    model: Any,
    run: _Run,
    train_data: Any,
    val_data: Any,
    collator: Any,
    callbacks: list[Any],
    task_metrics: Any = None,
) -> Any:
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    args = _training_arguments(settings, schedule, run.paths, run.precision, has_val=val_data is not None)
    trainer_class: Any = Trainer
    if uses_tuneloop_fsdp(settings, world_size(), has_gpu()):
        from tuneloop.train.fsdp import ShardedTrainer, shard_model

        _ = args.device  # sets up the process group (Accelerate), which sharding needs
        model = shard_model(model, settings.distributed, run.precision.torch_dtype)
        trainer_class = ShardedTrainer
    elif _computes_supervised_logits_only(settings, model):
        from tuneloop.train.head import supervised_head_trainer

        trainer_class = supervised_head_trainer(Trainer)
    if task_metrics is not None:
        from tuneloop.train.eval_generate import task_metrics_trainer

        trainer_class = task_metrics_trainer(trainer_class, task_metrics)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; the progress bar shows them
    return trainer


def _computes_supervised_logits_only(settings: TrainConfig, model: Any) -> bool:
    """`train.logits: supervised` unless the parameters are sharded (the head is then called outside the sharded
    forward, which gathers them) or the model scales its logits."""
    from tuneloop.train.head import supports_supervised_head

    if settings.logits != "supervised" or settings.distributed.strategy in ("fsdp", "deepspeed_zero3"):
        return False
    return supports_supervised_head(model) is None


def _training_arguments(
    settings: TrainConfig,
    schedule: Schedule,
    paths: RunPaths,
    precision: Precision,
    has_val: bool,
    arguments_class: Any = None,
    **extra: Any,
) -> Any:
    """`train.*` as Hugging Face training arguments: `TrainingArguments`, or a subclass (TRL's DPOConfig) given as
    `arguments_class` with its own fields in `extra` (which also override the defaults here)."""
    from transformers import TrainingArguments

    trackers = [name for name in settings.report_to if name != "mlflow"]
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")
    if "tensorboard" in trackers:  # set, not defaulted: each run (each sweep trial) logs into its own folder
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.tensorboard)
    use_16bit_autocast = settings.method != "qlora" or precision.name != "fp32"
    arguments = dict(
        output_dir=str(paths.checkpoints),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size * 2,  # no gradients or optimizer state: twice the rows fit
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=schedule.epochs,
        max_steps=settings.max_steps or -1,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=precision.name == "bf16" and use_16bit_autocast,
        fp16=precision.name == "fp16" and use_16bit_autocast,
        logging_steps=settings.logging_every,
        logging_first_step=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=schedule.eval_every,
        save_strategy="steps",
        save_steps=schedule.save_every,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=settings.keep_best and has_val,
        metric_for_best_model=settings.metric_for_best,
        greater_is_better=settings.greater_is_better(),
        report_to=trackers or "none",
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not has_gpu(),
        **trainer_arguments(settings, world_size(), has_gpu(), precision.name),
    )
    return (arguments_class or TrainingArguments)(**{**arguments, **extra})


def _mark_failed(run: _Run, tracker: Any) -> None:
    """A crash keeps the checkpoints: the record says `failed` and `--resume` continues from the last one."""
    run.record.status = "failed"
    run.record.save(run.paths.record)
    if tracker is not None:
        tracker.finish(status="FAILED")


def _finalize(
    config: LoopConfig,
    trainer: Any,
    model: Any,
    tokenizer: Any,
    run: _Run,
    prepared: PreparedDataset,
    throughput: Any,
    tracker: Any,
    started: float,
    model_memory_mb: float,
) -> TrainResult:
    """Save the adapter (or model), write the run's result, config and history, and close the MLflow run."""
    method = config.train.method
    eval_loss = _final_eval_loss(trainer, config.train.keep_best) if prepared.has_validation else None
    train_loss = next((entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None)
    output = _save_outputs(trainer, tokenizer, run.base, run.paths.output(method))
    _write_rank_report(trainer, run, config.train, throughput)
    result = TrainResult(
        run_id=run.record.run_id,
        run_dir=str(run.paths.root),
        method=method,
        adapter_path=str(output) if method != "full" else None,
        model_path=str(output) if method == "full" else None,
        base_model=config.base_model_spec(),
        base_weights_sha256=run.base_weights,
        train_loss=train_loss,
        eval_loss=eval_loss,
        steps=trainer.state.global_step,
        tokens=throughput.train_tokens(),
        tokens_per_second=round(throughput.tokens_per_second(), 1),
        first_step_seconds=round(throughput.first_step_seconds or 0.0, 1),
        compiled=run.compile,
        peak_memory_mb=round(peak_memory_mb(), 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        mlflow_run_id=run.record.mlflow_run_id,
        dataset_id=prepared.dataset_id,
        precision=run.precision.name,
        quantization=run.quantization,
        resumed_from=str(run.checkpoint) if run.checkpoint else None,
        memory_estimate_mb=round(run.estimate.total_mb),
        model_memory_mb=model_memory_mb,
        world_size=world_size(),
        nodes=world_size() // local_world_size(),
        metric_for_best=config.train.metric_for_best if config.train.keep_best else None,
        best_metric=trainer.state.best_metric if config.train.keep_best else None,
        best_step=trainer.state.best_global_step if config.train.keep_best else None,
        **_preference_fields(config.train, run.parent),
    )
    if not is_main_process():
        return result
    from tuneloop.artifacts._json import write_json

    result.save(run.paths.summary)
    write_json(run.paths.config, config.model_dump(mode="json"))
    write_json(run.paths.history, trainer.state.log_history)
    run.record.status = "finished"
    run.record.save(run.paths.record)
    if tracker is not None:
        if eval_loss is not None:
            tracker.log({"final_eval_loss": eval_loss}, step=result.steps)
        tracker.finish(artifacts=[output, run.paths.summary, run.paths.config, prepared.paths.report_html])
    return result


def _preference_fields(settings: TrainConfig, parent: Any) -> dict[str, Any]:
    if settings.method not in PREFERENCE_METHODS:
        return {}
    from tuneloop.train.preference import result_fields

    return result_fields(settings, parent)


def _final_eval_loss(trainer: Any, keep_best: bool) -> float:
    """The validation loss of the model as saved, without a second pass over the validation set when the last
    step was just evaluated (a full pass costs about a minute per 300 rows on 2 CPU cores)."""
    state = trainer.state
    logged = [entry for entry in state.log_history if "eval_loss" in entry]
    if keep_best and state.best_global_step:
        # load_best_model_at_end restored the checkpoint of that step (chosen by train.metric_for_best)
        at_best = [entry for entry in logged if entry.get("step") == state.best_global_step]
        if at_best:
            return float(at_best[-1]["eval_loss"])
    if logged and logged[-1].get("step") == state.global_step:
        return float(logged[-1]["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def _save_outputs(trainer: Any, tokenizer: Any, base: BaseModelRef, target: Path) -> Path:
    """PEFT-standard adapter folder (or full HF model) with tokenizer, chat template and generation config.

    Every rank calls the Trainer's save: under FSDP and ZeRO-3 the full state dict is gathered from all of them;
    rank 0 writes it."""
    if getattr(trainer, "is_fsdp_enabled", False):  # Accelerate's FSDP (GPUs): one full adapter, not shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(target))
    if not trainer.is_world_process_zero():
        return target
    tokenizer.save_pretrained(str(target))
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(base.source).save_pretrained(str(target))
    except OSError:
        pass  # the base model has no generation config
    return target


def _write_rank_report(trainer: Any, run: _Run, settings: TrainConfig, throughput: Any) -> None:
    """What this process held and trained: tests and users check sharding and synchronisation from these."""
    import hashlib
    import socket

    import psutil

    from tuneloop.artifacts.training import RankReport
    from tuneloop.train.fsdp import local_sizes, local_tensor

    model = trainer.model
    trainable, frozen = local_sizes(model)
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(local_tensor(parameter).detach().float().cpu().numpy().tobytes())
    RankReport(
        rank=global_rank(),
        world_size=world_size(),
        local_rank=local_rank(),
        host=socket.gethostname(),
        strategy=settings.distributed.strategy,
        trainable_local=trainable,
        frozen_local=frozen,
        trainable_sha256=digest.hexdigest(),
        tokens=throughput.local_tokens,
        peak_memory_mb=round(peak_memory_mb(), 1),
        resident_mb_at_end=round(psutil.Process().memory_info().rss / 2**20, 1),
    ).save(run.paths.rank_report(global_rank()))


def describe_failure(error: BaseException) -> TuneloopError:
    return TuneloopError(f"training failed: {error}", hint="fix the cause, then `tuneloop train -c CONFIG --resume`")


__all__ = ["TrainResult", "describe_failure", "load_base_for_training", "train_model"]
