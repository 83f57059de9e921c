"""Model cards in the Hugging Face format: YAML front matter (base_model, library_name, license, datasets, tags,
model-index with the evaluation results), then intended use, data, hyper-parameters, evaluation and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuneloop.artifacts.lineage import Lineage


def render_model_card(name: str, version: int, lineage: Lineage, license_name: str | None) -> str:
    train = lineage.config.get("train", {})
    evaluation = lineage.evaluation
    metrics = evaluation.metrics if evaluation else {}
    labels = list(metrics)
    tuned = metrics[labels[0]] if labels else {}
    results = (
        [
            {
                "task": {"type": "text-generation"},
                "dataset": {"name": lineage.data.fingerprint, "type": "custom"},
                "metrics": [{"type": metric, "value": round(float(value), 6)} for metric, value in tuned.items()],
            }
        ]
        if tuned
        else []
    )
    method = lineage.method
    base = lineage.base_model.reference
    front = {
        "base_model": base,
        "library_name": "transformers" if method == "full" else "peft",
        "license": license_name or "other",
        "datasets": [Path(source.path).name for source in lineage.data.sources],
        "tags": ["tuneloop", method, "text-generation"] + (["lora"] if method != "full" else []),
        "model-index": [{"name": f"{name}-v{version}", "results": results}],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name} v{version}", ""]
    lines += [
        f"A {_describe_method(method)} for `{base}`, trained with tuneloop (run `{lineage.run_id}`).",
        "",
        "## Intended use",
        "",
        "The task of its training data (below). It inherits the base model's limitations; check the evaluation before "
        "relying on it outside that task.",
        "",
        "## Training data",
        "",
        f"Dataset fingerprint `{lineage.data.fingerprint}`; "
        f"{lineage.data.counts.get('train_rows', '?')} train / {lineage.data.counts.get('val_rows', '?')} "
        "validation rows after quality filters.",
        "",
    ]
    lines += [f"- `{source.path}` ({source.format}, {source.rows} rows)" for source in lineage.data.sources]
    lines += ["", "## Hyper-parameters", "", "| parameter | value |", "|---|---|"]
    lora = train.get("lora", {})
    for key in (
        "method",
        "max_steps",
        "epochs",
        "batch_size",
        "grad_accum",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "weight_decay",
        "precision",
        "seed",
    ):
        if key in train:
            lines.append(f"| {key} | {train[key]} |")
    if method != "full":
        lines += [f"| lora.{key} | {lora.get(key)} |" for key in ("r", "alpha", "dropout", "target_modules")]
    training = lineage.training
    lines += [
        "",
        f"Trained {training.steps} steps on {training.tokens:,} tokens at {training.tokens_per_second:.0f} "
        f"tokens/s ({training.precision}); final train loss {training.train_loss}, validation loss "
        f"{training.eval_loss}.",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        header = "| metric | " + " | ".join(labels) + " |"
        lines += [
            f"On {evaluation.rows} rows of `{evaluation.data}`:",
            "",
            header,
            "|---|" + "---:|" * len(labels),
        ]
        names = sorted({metric for values in metrics.values() for metric in values})
        for metric in names:
            cells = [_fmt(metrics[label].get(metric)) for label in labels]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        gates = evaluation.gates
        if gates:
            lines += ["", "Gates: " + ", ".join(f"{gate}: **{result}**" for gate, result in gates.items())]
    else:
        lines.append("Not evaluated yet (`tuneloop eval`).")
    artifact = lineage.artifact
    base_folder = lineage.base_model.folder or base
    lines += [
        "",
        "## Limitations",
        "",
        "Small models hallucinate and can be steered into unsafe output; the evaluation covers only the rows above.",
        "",
        "## How to load it",
        "",
        "Transformers + PEFT:" if method != "full" else "Transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if method != "full":
        lines += [
            "from peft import PeftModel",
            f'tokenizer = AutoTokenizer.from_pretrained("{artifact}")',
            f'base = AutoModelForCausalLM.from_pretrained("{base_folder}")',
            f'model = PeftModel.from_pretrained(base, "{artifact}")',
        ]
    else:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{artifact}")']
    lines += [
        "```",
        "",
        f"vLLM: `vllm serve {base_folder} --enable-lora --lora-modules {name}={artifact}`"
        if method != "full"
        else f"vLLM: `vllm serve {artifact}`",
        "",
        f"tuneloop: `tuneloop eval -c CONFIG --model {name}/{version}`, `tuneloop export {name}/{version} --format merged`.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _describe_method(method: str) -> str:
    """What the version is, in words: the adapter kinds by training method, else a fully fine-tuned model."""
    adapters = {"lora": "LoRA", "qlora": "QLoRA", "dpo": "DPO-tuned LoRA", "orpo": "ORPO-tuned LoRA"}
    return f"{adapters[method]} adapter" if method in adapters else "fully fine-tuned model"
