"""`tuneloop train`: the recipe. Prepared data + base model + PEFT adapter (or full weights) -> Transformers Trainer.

Thin wiring over the libraries that do the work: Transformers' Trainer (loop, schedules, checkpoints, exact resume,
DDP through Accelerate), PEFT (LoRA/DoRA/rsLoRA), bitsandbytes (NF4). tuneloop adds the choices that make it fast and
safe on the machine at hand (packing, precision, the 4-bit CPU fix, the memory preflight) and the bookkeeping
(run folder, MLflow, summary).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneloop.config import LoopConfig
from tuneloop.data.prepare import PreparedDataset, prepare_dataset
from tuneloop.errors import TuneloopError
from tuneloop.models import load_tokenizer, materialize, resolve_base
from tuneloop.train.device import Precision, available_memory_mb, has_cuda, peak_memory_mb, resolve_precision
from tuneloop.train.memory import MemoryEstimate, estimate_memory, preflight
from tuneloop.train.runs import RunRecord, find_resumable, last_checkpoint, new_run_id, run_key
from tuneloop.workspace import Workspace

SUMMARY = "summary.json"
HISTORY = "history.json"


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    method: str
    adapter_path: str | None
    model_path: str | None
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens: int
    tokens_per_second: float
    peak_memory_mb: float
    wall_seconds: float
    mlflow_run_id: str | None
    dataset_id: str
    precision: str
    quantization: str | None
    resumed_from: str | None
    memory_estimate_mb: float
    model_memory_mb: float

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    """Train per `config.train`; with `resume`, continue the newest unfinished run of the same config."""
    console = console or Console(stderr=True)
    quiet = not is_main_process()
    settings = config.train
    started = time.perf_counter()
    prepared = prepared or prepare_dataset(config, workspace, console=Console(stderr=True, quiet=quiet))
    precision = resolve_precision(settings.precision)
    quantization = None
    if settings.method == "qlora":
        from tuneloop.train.quant import require_four_bit_backend

        quantization = require_four_bit_backend().describe()
    base = resolve_base(config.base_model_spec(), workspace)
    base_folder = materialize(base) if base.kind != "hub" else None
    base_source = str(base_folder) if base_folder else str(base.hub_id)

    from transformers import AutoConfig

    estimate = estimate_memory(
        AutoConfig.from_pretrained(base_source),
        settings.method,
        settings.lora.r,
        settings.batch_size,
        config.data.max_seq_len if config.data.packing else max(prepared.manifest["tokens"]["p95"], 1),
        precision.name,
        settings.gradient_checkpointing,
    )
    warning = preflight(estimate, available_memory_mb(), settings.preflight)
    if warning and not quiet:
        console.print(f"[yellow]warning:[/] {warning}")

    key = run_key(config.section_dump("train"), config.model.base, prepared.dataset_id)
    record, checkpoint = _open_run(workspace, key, prepared.dataset_id, config.project.name, resume, run_id, console)
    run_dir = workspace.run_dir(record.run_id)
    if not quiet:
        console.print(
            f"run [bold]{record.run_id}[/]: {settings.method} on {config.model.base}, precision {precision.name} "
            f"({precision.reason})"
            + (f", 4-bit backend: {quantization}" if quantization else "")
            + (f", resuming from {checkpoint.name}" if checkpoint else "")
        )

    import torch
    from transformers import set_seed

    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    set_seed(settings.seed)
    tokenizer = load_tokenizer(base, config.chat_template_spec())
    model = _load_model(base_source, settings.method, precision, settings.gradient_checkpointing)
    model_memory_mb = round(model.get_memory_footprint() / 2**20, 1)
    if settings.method in ("lora", "qlora"):
        from peft import get_peft_model

        from tuneloop.train.lora import peft_lora_config

        model = get_peft_model(model, peft_lora_config(settings.lora, model))

    from tuneloop.train.callbacks import RichProgressCallback, ThroughputCallback
    from tuneloop.train.inputs import CountingCollator, TokenCounter, load_splits

    train_data, val_data = load_splits(prepared)
    counter = TokenCounter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CountingCollator(config.data.packing, pad_id, counter)
    throughput = ThroughputCallback(counter)
    all_callbacks: list[Any] = [throughput, RichProgressCallback(console, throughput), *callbacks]
    if settings.early_stopping_patience and val_data is not None:
        from transformers import EarlyStoppingCallback

        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    tracker = None
    if "mlflow" in settings.report_to and is_main_process():
        tracker = _mlflow_tracker(config, workspace, record, prepared, precision, quantization)
        record.mlflow_run_id = tracker.start()
        all_callbacks.append(tracker)
    if is_main_process():
        record.save(run_dir)

    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=_training_arguments(config, run_dir, precision, has_val=val_data is not None),
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        callbacks=all_callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; the progress bar shows them
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException as error:
        if is_main_process():
            record.status = "pruned" if type(error).__name__ == "TrialPruned" else "failed"
            record.save(run_dir)
            if tracker:
                tracker.finish([], status="KILLED" if record.status == "pruned" else "FAILED")
        raise

    eval_loss = None
    if val_data is not None:
        eval_loss = _final_eval_loss(trainer, settings.keep_best)
    train_loss = next((entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None)
    output = _save_outputs(trainer, model, tokenizer, base_source, settings.method, run_dir)
    result = TrainResult(
        run_id=record.run_id,
        run_dir=str(run_dir),
        method=settings.method,
        adapter_path=str(output) if settings.method != "full" else None,
        model_path=str(output) if settings.method == "full" else None,
        train_loss=train_loss,
        eval_loss=eval_loss,
        steps=trainer.state.global_step,
        tokens=throughput.train_tokens(),
        tokens_per_second=round(throughput.tokens_per_second(), 1),
        peak_memory_mb=round(peak_memory_mb(), 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        mlflow_run_id=record.mlflow_run_id,
        dataset_id=prepared.dataset_id,
        precision=precision.name,
        quantization=quantization,
        resumed_from=str(checkpoint) if checkpoint else None,
        memory_estimate_mb=round(estimate.total_mb),
        model_memory_mb=model_memory_mb,
    )
    if is_main_process():
        (run_dir / SUMMARY).write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
        (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2), encoding="utf-8")
        # Loss curves for the dashboard, without opening MLflow.
        (run_dir / HISTORY).write_text(json.dumps(trainer.state.log_history), encoding="utf-8")
        record.status = "finished"
        record.save(run_dir)
        if tracker:
            if eval_loss is not None:
                tracker.client.log_metric(tracker.run_id, "final_eval_loss", eval_loss, step=result.steps)
            tracker.finish([output, run_dir / SUMMARY, run_dir / "config.json", prepared.path / "report.html"])
    return result


def load_result(run_dir: Path) -> TrainResult:
    return TrainResult(**json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")))


def _final_eval_loss(trainer: Any, keep_best: bool) -> float:
    """The validation loss of the model as saved, without a second pass over the validation set when the last
    step was just evaluated (a full pass costs about a minute per 300 rows on 2 CPU cores)."""
    state = trainer.state
    if keep_best and state.best_metric is not None:
        return float(state.best_metric)  # load_best_model_at_end restored the checkpoint with this eval_loss
    logged = [entry for entry in state.log_history if "eval_loss" in entry]
    if logged and logged[-1].get("step") == state.global_step:
        return float(logged[-1]["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def _open_run(
    workspace: Workspace, key: str, dataset_id: str, project: str, resume: bool, run_id: str | None, console: Console
) -> tuple[RunRecord, Path | None]:
    if run_id is not None and (workspace.run_dir(run_id) / "run.json").exists():
        record = RunRecord.load(workspace.run_dir(run_id))
        checkpoint = last_checkpoint(workspace.run_dir(run_id)) if resume else None
        if checkpoint is not None:
            record.attempts += 1
            record.status = "running"
        return record, checkpoint
    if resume and run_id is None:
        found = find_resumable(workspace, key)
        if found is not None:
            found.attempts += 1
            found.status = "running"
            return found, last_checkpoint(workspace.run_dir(found.run_id))
        if is_main_process():
            console.print(
                "[yellow]nothing to resume for this config (no unfinished run with a checkpoint); starting a new run[/]"
            )
    record = RunRecord(
        run_id=run_id or new_run_id(project, key),
        key=key,
        status="running",
        dataset_id=dataset_id,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return record, None


def _load_model(source: str, method: str, precision: Precision, gradient_checkpointing: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if method == "qlora":
        from tuneloop.train.quant import nf4_config

        compute = precision.torch_dtype if precision.name != "fp32" else None
        import torch

        compute = compute or torch.float32
        kwargs["quantization_config"] = nf4_config(compute)
        kwargs["dtype"] = compute
    elif method == "lora" and precision.name in ("bf16", "fp16"):
        # A frozen base needs no fp32 master copy: 16-bit base weights halve memory and run faster; PEFT keeps
        # the adapter weights in fp32.
        kwargs["dtype"] = precision.torch_dtype
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
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


def _training_arguments(config: LoopConfig, run_dir: Path, precision: Precision, has_val: bool) -> Any:
    from transformers import TrainingArguments

    settings = config.train
    trackers = [name for name in settings.report_to if name != "mlflow"]
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")
    if "tensorboard" in trackers:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    use_16bit_autocast = settings.method != "qlora" or precision.name != "fp32"
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
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
        eval_steps=settings.eval_every,
        save_strategy="steps",
        save_steps=settings.save_every,
        save_total_limit=settings.save_total_limit,
        load_best_model_at_end=settings.keep_best and has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=trackers or "none",
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not has_cuda(),
    )


def _save_outputs(trainer: Any, model: Any, tokenizer: Any, base_source: str, method: str, run_dir: Path) -> Path:
    """PEFT-standard adapter folder (or full HF model) with tokenizer, chat template and generation config."""
    target = run_dir / ("model" if method == "full" else "adapter")
    if not trainer.is_world_process_zero():
        return target
    if method == "full":
        trainer.save_model(str(target))
    else:
        model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(base_source).save_pretrained(str(target))
    except OSError:
        pass  # the base model has no generation config
    return target


def _mlflow_tracker(
    config: LoopConfig,
    workspace: Workspace,
    record: RunRecord,
    prepared: PreparedDataset,
    precision: Precision,
    quantization: str | None,
) -> Any:
    from tuneloop.train.tracking import MlflowCallback, flatten, setup_mlflow

    client, experiment = setup_mlflow(workspace, config.registry.tracking_uri, config.project.name)
    params = flatten(
        "",
        {
            "train": config.section_dump("train"),
            "model": config.section_dump("model"),
            "data": {k: v for k, v in config.section_dump("data").items() if k != "sources"},
        },
        {},
    )
    params["data.sources"] = json.dumps([source["path"] for source in config.section_dump("data")["sources"]])
    params["data.source_sha256"] = json.dumps(prepared.manifest["fingerprint_inputs"]["sources"])
    tags = {
        "tuneloop.run_id": record.run_id,
        "tuneloop.dataset_id": prepared.dataset_id,
        "tuneloop.data_fingerprint": prepared.dataset_id,
        "tuneloop.base_model": config.model.base,
        "tuneloop.method": config.train.method,
        "tuneloop.precision": precision.name,
        "tuneloop.quantization": quantization or "none",
    }
    return MlflowCallback(client, experiment, record.run_id, params, tags, mlflow_run_id=record.mlflow_run_id)


def describe_failure(error: BaseException) -> TuneloopError:
    return TuneloopError(f"training failed: {error}", hint="fix the cause, then `tuneloop train -c CONFIG --resume`")


__all__ = ["MemoryEstimate", "TrainResult", "load_result", "train_model"]
