"""Text metrics against references: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), exact match, classification
accuracy with per-label precision/recall and confusion counts, and generation-quality statistics; per-row scores
(`per_row_scores`) for the paired significance tests in tuneloop.stats."""

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
    rows = rouge_rows(predictions, references)
    return {name: statistics.fmean(values) if values else 0.0 for name, values in rows.items()}


def rouge_rows(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measure of each row (stemmed); `rouge` is their mean."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, prediction) for prediction, reference in zip(predictions, references, strict=True)
    ]
    return {
        "rouge_1": [score["rouge1"].fmeasure for score in scores],
        "rouge_2": [score["rouge2"].fmeasure for score in scores],
        "rouge_l": [score["rougeL"].fmeasure for score in scores],
    }


def exact_match(predictions: list[str], references: list[str], answer_regex: str | None = None) -> float:
    hits = exact_match_rows(predictions, references, answer_regex)
    return sum(hits) / len(hits) if hits else 0.0


def exact_match_rows(predictions: list[str], references: list[str], answer_regex: str | None = None) -> list[float]:
    """1.0 where the (extracted, normalised) answer equals the reference, else 0.0."""
    pairs = zip(predictions, references, strict=True)
    return [float(normalise_answer(extract_answer(p, answer_regex)) == normalise_answer(r)) for p, r in pairs]


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


def per_row_scores(
    outputs: list[str],
    references: list[str],
    groups: set[str],
    labels: list[str] | None = None,
    answer_regex: str | None = None,
) -> dict[str, list[float]]:
    """Each row's score for the requested metric groups, for paired significance tests (tuneloop.stats):
    `exact_match` and `accuracy` as 1/0, `rouge` (or `rouge_l`) as rouge_1/rouge_2/rouge_l, and `bleu` as sentence
    BLEU (sacrebleu's default smoothing). The mean of a row list is the corpus metric for exact match, accuracy and
    ROUGE; corpus BLEU is not the mean of sentence BLEU, so the BLEU test compares mean sentence BLEU."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    scores: dict[str, list[float]] = {}
    if "exact_match" in groups:
        scores["exact_match"] = exact_match_rows(outputs, references, answer_regex)
    if "accuracy" in groups:
        predicted = [predict_label(output, labels, answer_regex) for output in outputs]
        scores["accuracy"] = [float(p == normalise_answer(r)) for p, r in zip(predicted, references, strict=True)]
    if groups & {"rouge", "rouge_l"}:
        scores.update(rouge_rows(outputs, references))
    if "bleu" in groups:
        import sacrebleu

        scores["bleu"] = [
            float(sacrebleu.sentence_bleu(output, [reference]).score)
            for output, reference in zip(outputs, references, strict=True)
        ]
    return scores


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
