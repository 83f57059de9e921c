"""`train.eval_generate`: task metrics during training.

At validations, greedy answers are generated for the first `rows` chat rows of the validation split (batched, left
padded, in eval mode without gradients, the model put back in train mode after) and scored against the rows'
reference answers with `tuneloop.scoring`; the scores join the validation's log entry as `eval_<metric>`, so they
reach the log history (history.json), MLflow, the progress display, keep-best and early stopping like `eval_loss`.

Generation goes through the training model as it is: the PEFT wrapper for LoRA/QLoRA (its 4-bit layers were made
safe for no-grad passes when loaded, see quant.py), the full model otherwise; compiled decoder layers run eagerly
here (decoding shapes change every token, and recompiling for them would cost more than it saves).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from tuneloop.artifacts.dataset import PreparedDataset
from tuneloop.config import EvalGenerateConfig
from tuneloop.errors import ConfigError

AUTO_TOKEN_MARGIN = 8  # `max_new_tokens: auto` = the longest reference + this

# Opens a progress display for `total` rows and returns the function that advances it.
ProgressOpener = Callable[[int], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class GenerationRows:
    prompts: list[list[dict[str, str]]]
    references: list[str]


def load_generation_rows(prepared: PreparedDataset, rows: int) -> GenerationRows:
    """The first `rows` chat rows of the validation split that end with an assistant answer: the prompt (every
    message before that answer) and the answer as the reference."""
    if not prepared.has_validation:
        raise ConfigError(
            "train.eval_generate needs a validation split, and this dataset has none",
            hint="set data.val_fraction (or a validation source), or remove train.eval_generate",
        )
    path = prepared.paths.conversations("val")
    prompts: list[list[dict[str, str]]] = []
    references: list[str] = []
    for line in path.read_text().splitlines():
        conversation = json.loads(line)
        messages = conversation["messages"]
        if conversation["kind"] != "chat" or messages[-1]["role"] != "assistant":
            continue
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
        if len(prompts) >= rows:
            break
    if not prompts:
        raise ConfigError(
            f"train.eval_generate found no chat rows with an assistant answer in {path}",
            hint="task metrics need prompt/answer rows; plain-text datasets can use eval_loss only",
        )
    return GenerationRows(prompts, references)


def score_answers(
    answers: list[str], references: list[str], groups: list[str], labels: list[str] | None, answer_regex: str | None
) -> dict[str, float]:
    """The metric groups' values (unprefixed: `exact_match`, `rouge_l`, ...)."""
    from tuneloop import scoring

    values: dict[str, float] = {}
    if "exact_match" in groups:
        values["exact_match"] = scoring.exact_match(answers, references, answer_regex)
    if "accuracy" in groups:
        values["accuracy"] = float(scoring.classification(answers, references, labels, answer_regex)["accuracy"])
    if "rouge" in groups:
        values.update(scoring.rouge(answers, references))
    if "bleu" in groups:
        values["bleu"] = scoring.bleu(answers, references)
    return values


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, `batch_size` at a time, left padded; the model's train/eval mode is restored."""
    import torch
    from transformers import GenerationConfig

    from tuneloop.models import pad_token_id

    pad_id = pad_token_id(tokenizer)
    stop_ids = sorted({tokenizer.eos_token_id, *_model_eos_ids(model)} - {None})
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,  # training turns the cache off in the model's config
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for start in range(0, len(prompts), batch_size):
                texts = [
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    for messages in prompts[start : start + batch_size]
                ]
                batch = tokenizer(
                    texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
                ).to(device)
                with autocast():
                    output = model.generate(**batch, generation_config=settings)
                for row in output[:, batch["input_ids"].shape[1] :].tolist():
                    ended = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
                    answers.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
                if advance is not None:
                    advance(len(texts))
    finally:
        model.train(was_training)
    return answers


def _model_eos_ids(model: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        return []
    return list(configured) if isinstance(configured, list | tuple) else [configured]


class TaskMetrics:
    """What `train.eval_generate` computes at a validation: when it is due, and the prefixed metrics."""

    def __init__(
        self,
        settings: EvalGenerateConfig,
        tokenizer: Any,
        rows: GenerationRows,
        labels: list[str] | None,
        answer_regex: str | None,
        progress: ProgressOpener | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.rows = rows
        self.labels = labels
        self.answer_regex = answer_regex
        self.progress = progress
        self.max_new_tokens = (
            settings.max_new_tokens if isinstance(settings.max_new_tokens, int) else self._auto_budget()
        )

    def _auto_budget(self) -> int:
        lengths = [len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in self.rows.references]
        return max(lengths) + AUTO_TOKEN_MARGIN

    def due(self, step: int, last_step: int) -> bool:
        every = self.settings.every
        return every == "eval" or step % every == 0 or step >= last_step

    def compute(
        self, model: Any, autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    ) -> dict[str, float]:
        """`eval_<metric>` for the model as it is now, and `eval_generate_seconds` (the time this took)."""
        started = time.perf_counter()
        with self._progress(len(self.rows.prompts)) as advance:
            answers = generate_answers(
                model,
                self.tokenizer,
                self.rows.prompts,
                self.max_new_tokens,
                self.settings.batch_size,
                autocast,
                advance,
            )
        values = score_answers(
            answers, self.rows.references, list(self.settings.metrics), self.labels, self.answer_regex
        )
        metrics = {f"eval_{name}": round(value, 6) for name, value in values.items()}
        metrics["eval_generate_seconds"] = round(time.perf_counter() - started, 3)
        return metrics

    def _progress(self, total: int) -> AbstractContextManager[Callable[[int], None]]:
        return self.progress(total) if self.progress is not None else nullcontext(lambda _done: None)


def task_metrics_trainer(trainer_class: Any, task_metrics: TaskMetrics) -> Any:
    """`trainer_class` whose validations also compute `task_metrics` when due: they join the validation's metrics
    before the Trainer logs them and compares them for keep-best and early stopping."""

    class TaskMetricsTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            if prefix == "eval" and task_metrics.due(self.state.global_step, self.state.max_steps):
                output.metrics.update(task_metrics.compute(self.model, self.autocast_smart_context_manager))
            return output

    return TaskMetricsTrainer
