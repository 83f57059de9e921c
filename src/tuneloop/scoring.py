"""Text metrics against references: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), exact match, classification
accuracy with per-label precision/recall and confusion counts, and generation-quality statistics."""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from typing import Any

_SPACES = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and quotes."""
    return _SPACES.sub(" ", text.lower()).strip().strip(string.punctuation + " ")


def extract_answer(text: str, answer_regex: str | None) -> str:
    if answer_regex:
        found = re.search(answer_regex, text, flags=re.DOTALL)
        if found:
            return found.group(1) if found.groups() else found.group(0)
    return text


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, prediction) for prediction, reference in zip(predictions, references, strict=True)
    ]
    return {
        "rouge_1": statistics.fmean(score["rouge1"].fmeasure for score in scores) if scores else 0.0,
        "rouge_2": statistics.fmean(score["rouge2"].fmeasure for score in scores) if scores else 0.0,
        "rouge_l": statistics.fmean(score["rougeL"].fmeasure for score in scores) if scores else 0.0,
    }


def exact_match(predictions: list[str], references: list[str], answer_regex: str | None = None) -> float:
    pairs = zip(predictions, references, strict=True)
    hits = [normalise_answer(extract_answer(p, answer_regex)) == normalise_answer(r) for p, r in pairs]
    return sum(hits) / len(hits) if hits else 0.0


def predict_label(text: str, labels: list[str] | None, answer_regex: str | None) -> str:
    answer = normalise_answer(extract_answer(text, answer_regex))
    if not labels:
        return answer
    positions = []
    for label in labels:
        found = re.search(rf"\b{re.escape(label.lower())}\b", answer)
        if found:
            positions.append((found.start(), label.lower()))
    return min(positions)[1] if positions else "<none>"


def classification(
    predictions: list[str], references: list[str], labels: list[str] | None, answer_regex: str | None
) -> dict[str, Any]:
    """Accuracy; with a label set also per-label precision/recall and the confusion counts."""
    predicted = [predict_label(p, labels, answer_regex) for p in predictions]
    actual = [normalise_answer(r) for r in references]
    correct = sum(p == a for p, a in zip(predicted, actual, strict=True))
    result: dict[str, Any] = {"accuracy": correct / len(actual) if actual else 0.0}
    if labels:
        confusion = Counter(zip(actual, predicted, strict=True))
        per_label = {}
        for label in (label.lower() for label in labels):
            true_positive = confusion[(label, label)]
            predicted_as = sum(count for (_, p), count in confusion.items() if p == label)
            actually = sum(count for (a, _), count in confusion.items() if a == label)
            per_label[label] = {
                "precision": true_positive / predicted_as if predicted_as else 0.0,
                "recall": true_positive / actually if actually else 0.0,
                "support": actually,
            }
        result["per_label"] = per_label
        result["confusion"] = {f"{a} -> {p}": count for (a, p), count in sorted(confusion.items())}
        result["unparsed_rate"] = predicted.count("<none>") / len(predicted) if predicted else 0.0
    return result


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams in an output that repeat an earlier n-gram of the same output."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def generation_stats(lengths: list[int], texts: list[str], hit_max: list[bool]) -> dict[str, float]:
    return {
        "mean_output_tokens": statistics.fmean(lengths) if lengths else 0.0,
        "p95_output_tokens": sorted(lengths)[int(0.95 * (len(lengths) - 1))] if lengths else 0,
        "repetition_rate": statistics.fmean(repetition_rate(text) for text in texts) if texts else 0.0,
        "max_tokens_hit_rate": sum(hit_max) / len(hit_max) if hit_max else 0.0,
    }
