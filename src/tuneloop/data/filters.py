"""Quality filters. Each takes the surviving samples and returns (kept, rejected-with-reason).

Reasons are the keys of the `filtered` report: `duplicate`, `near_duplicate`, `toxic` here; `too_short`, `too_long`
and `no_trainable_tokens` come from tokenization (prepare.py); `malformed` and `missing_field` from parsing.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from tuneloop.config import NearDuplicateFilter, ToxicityFilter
from tuneloop.data.formats import Sample

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Rejection:
    sample: Sample
    reason: str
    detail: str


def normalised_text(sample: Sample) -> str:
    """Lower-cased, whitespace-collapsed text of the whole conversation: rows equal up to case and spacing match."""
    return _WHITESPACE.sub(" ", sample.text_for_dedup().lower()).strip()


def drop_exact_duplicates(samples: list[Sample]) -> tuple[list[Sample], list[Rejection]]:
    first_seen: dict[bytes, Sample] = {}
    kept, rejected = [], []
    for sample in samples:
        key = hashlib.blake2b(normalised_text(sample).encode("utf-8"), digest_size=16).digest()
        original = first_seen.get(key)
        if original is None:
            first_seen[key] = sample
            kept.append(sample)
        else:
            rejected.append(Rejection(sample, "duplicate", f"same text as {_where(original)}"))
    return kept, rejected


def drop_near_duplicates(samples: list[Sample], config: NearDuplicateFilter) -> tuple[list[Sample], list[Rejection]]:
    """MinHash LSH over word n-gram shingles; the first row of a near-duplicate group is kept."""
    from datasketch import MinHash, MinHashLSH

    shingle_sets = _without_boilerplate([shingles(normalised_text(sample), config.ngram) for sample in samples])
    # MinHash.bulk hashes every row in vectorised numpy batches: ~10x faster than update() per shingle.
    minhashes = MinHash.bulk(shingle_sets, num_perm=config.num_perm, seed=1)
    # LSH finds candidates (its banding cannot represent thresholds near 1); each is confirmed by its estimated Jaccard.
    index = MinHashLSH(threshold=min(config.threshold, 0.9), num_perm=config.num_perm)
    kept, rejected = [], []
    for position, (sample, minhash, row_shingles) in enumerate(zip(samples, minhashes, shingle_sets, strict=True)):
        if not row_shingles:
            kept.append(sample)
            continue
        candidates = index.query(minhash)
        if candidates:
            match = min(candidates)
            similarity = minhash.jaccard(minhashes[match])
            if similarity >= config.threshold:
                rejected.append(
                    Rejection(sample, "near_duplicate", f"~{similarity:.2f} similar to {_where(samples[match])}")
                )
                continue
        index.insert(position, minhash)
        kept.append(sample)
    return kept, rejected


def _without_boilerplate(shingle_sets: list[list[bytes]], max_share: float = 0.5) -> list[list[bytes]]:
    """Drop shingles found in more than `max_share` of the rows (a shared instruction or system prompt): otherwise
    every pair of short rows with the same instruction would look near-identical."""
    if len(shingle_sets) < 20:
        return shingle_sets
    counts = Counter(shingle for shingles in shingle_sets for shingle in shingles)
    limit = max_share * len(shingle_sets)
    common = {shingle for shingle, count in counts.items() if count > limit}
    if not common:
        return shingle_sets
    return [[shingle for shingle in shingles if shingle not in common] for shingles in shingle_sets]


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct word `ngram`s of a normalised text (the whole text when shorter), as MinHash input."""
    words = _WORD.findall(text)
    if len(words) < ngram:
        return [" ".join(words).encode("utf-8")] if words else []
    return list({" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)})


def drop_toxic(samples: list[Sample], config: ToxicityFilter) -> tuple[list[Sample], list[Rejection]]:
    """Score turns with alt-profanity-check's offline SVM; a row goes when any scored turn reaches the threshold."""
    from profanity_check import predict_prob

    owners: list[int] = []
    texts: list[str] = []
    for position, sample in enumerate(samples):
        for message in sample.messages:
            if config.scope == "all" or message.role in ("assistant", "text"):
                owners.append(position)
                texts.append(message.content)
    scores = [0.0] * len(samples)
    if texts:
        for owner, probability in zip(owners, predict_prob(texts), strict=True):
            scores[owner] = max(scores[owner], float(probability))
    kept, rejected = [], []
    for sample, score in zip(samples, scores, strict=True):
        if score >= config.threshold:
            rejected.append(Rejection(sample, "toxic", f"offensive-language probability {score:.2f}"))
        else:
            kept.append(sample)
    return kept, rejected


def _where(sample: Sample) -> str:
    return f"{sample.source}:{sample.line}" if sample.line is not None else f"{sample.source}#row{sample.row}"
