from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tuneloop import scoring as metrics
from tuneloop.errors import ConfigError
from tuneloop.evaluate.gates import check_gates
from tuneloop.evaluate.pairwise import import_ratings, write_sheet
from tuneloop.stats import wilson_interval
from tuneloop.workspace import EvalPaths


def test_perplexity_equals_exp_mean_nll_computed_independently(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tuneloop.evaluate.generate import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [
        {"input_ids": [5, 9, 13, 40, 41, 42, 2], "labels": [-100, -100, -100, 40, 41, 42, 2]},
        {"input_ids": [7, 8, 50, 51], "labels": [-100, -100, 50, 51]},
        {"input_ids": [3, 4, 5, 6, 60, 61, 62, 63, 2], "labels": [-100] * 4 + [60, 61, 62, 63, 2]},
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row at a time, no padding, explicit log-softmax
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double(), -1)
            for position in range(1, len(row["input_ids"])):
                if row["labels"][position] != -100:
                    total -= float(log_probs[position - 1, row["labels"][position]])
                    count += 1
    result = perplexity(model, rows, pad_token_id=2, batch_size=2)
    assert result["perplexity_tokens"] == count == 11
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_bleu_rouge_exact_match_on_known_strings() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "a quick brown fox", "hello world"]
    references = ["the cat sat on the mat", "the quick brown fox jumps", "goodbye world"]
    assert metrics.bleu(predictions, references) == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [references]).score
    )
    assert metrics.bleu(["the same six words in both"], ["the same six words in both"]) == pytest.approx(100.0)
    scores = metrics.rouge(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)) / 3
    assert scores["rouge_l"] == pytest.approx(expected)
    assert metrics.rouge(["a b c"], ["a b c"])["rouge_1"] == pytest.approx(1.0)
    assert metrics.exact_match(["  Paris. ", "london", "Berlin is it"], ["paris", "London", "Berlin"]) == pytest.approx(
        2 / 3
    )
    assert metrics.exact_match(["Answer: 42 because"], ["42"], answer_regex=r"Answer:\s*(\d+)") == 1.0


def test_classification_accuracy_per_label_and_confusion() -> None:
    outputs = ["Positive!", "I think it is negative.", "negative", "positive, clearly", "no idea", "Negative"]
    references = ["positive", "negative", "positive", "positive", "negative", "negative"]
    result = metrics.classification(outputs, references, ["positive", "negative"], None)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_label"]["positive"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "support": 3}
    assert result["per_label"]["negative"]["precision"] == pytest.approx(2 / 3)
    assert result["confusion"]["positive -> negative"] == 1 and result["confusion"]["negative -> <none>"] == 1
    assert result["unparsed_rate"] == pytest.approx(1 / 6)


def test_generation_stats() -> None:
    stats = metrics.generation_stats([3, 10], ["a b c", "go go go go go go"], [False, True])
    assert stats["max_tokens_hit_rate"] == 0.5 and stats["mean_output_tokens"] == 6.5
    assert stats["repetition_rate"] == pytest.approx((0 + 3 / 4) / 2)


def test_gates() -> None:
    tuned = {"perplexity": 8.0, "accuracy": 0.9, "toxicity_rate": 0.1}
    base = {"perplexity": 10.0, "accuracy": 0.5, "toxicity_rate": 0.0}
    gates = check_gates({"perplexity_improvement": 0.2, "accuracy": 0.85, "toxicity_rate_max": 0.05}, tuned, base)
    assert {gate: result["result"] for gate, result in gates.items()} == {
        "perplexity_improvement": "pass",
        "accuracy": "pass",
        "toxicity_rate_max": "fail",
    }
    assert gates["perplexity_improvement"]["value"] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="'bleu' was not computed"):
        check_gates({"bleu": 10}, tuned, base)


def test_pairwise_sheet_and_ratings(tmp_path: Path) -> None:
    paths = write_sheet(
        EvalPaths(tmp_path),
        ["p1", "p2", "p3", "p4"],
        ["t1", "t2", "t3", "t4"],
        ["b1", "b2", "b3", "b4"],
        ("tuned", "base"),
        seed=3,
    )
    import csv
    import json

    key = json.loads(paths["key"].read_text())
    rows = list(csv.DictReader(paths["sheet"].open()))
    assert "tuned" not in paths["sheet"].read_text()  # blind: no model names in the sheet
    with (tmp_path / "ratings.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "preference"])
        writer.writeheader()
        for index, row in enumerate(rows):  # prefer tuned 3 times, tie once
            tuned_side = "A" if key[row["id"]]["A"] == "tuned" else "B"
            writer.writerow({"id": row["id"], "preference": "tie" if index == 3 else tuned_side})
    result = import_ratings(tmp_path / "ratings.csv")
    assert (result["wins"], result["ties"], result["losses"]) == (3, 1, 0)
    assert result["preference_rate"] == pytest.approx(3.5 / 4)
    low, high = result["ci95"]
    assert low < 3.5 / 4 < high and (low, high) == pytest.approx(wilson_interval(3.5 / 4, 4))
