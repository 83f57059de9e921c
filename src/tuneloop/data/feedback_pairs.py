"""`tuneloop data from-feedback`: preference rows (prompt / chosen / rejected, TRL's conversational layout) from what
people said about served answers, for `train.method: dpo | orpo`.

Two sources:

- **Gateway feedback**: ratings posted to /v1/feedback (`serve/feedback.jsonl`) joined by response id to the traffic
  log (`serve/traffic.jsonl`, written when `serve.log_traffic` is on), which holds the prompt and answer each rating
  is about. Responses are grouped by prompt (the chat messages with roles lower-cased and runs of whitespace made one
  space); within a prompt, identical answers are one candidate. A candidate's score is the mean of its ratings on
  one scale: `up` = 1, `down` = 0, stars n = (n - 1) / 4 (1 star = 0, 3 = 0.5, 5 = 1). Every two candidates with
  different scores make a pair: the higher-scored answer is `chosen`; equal scores are a tie and dropped. Per prompt
  at most `max_pairs_per_prompt` pairs are kept, widest score gap first (then earliest answers), so one popular
  prompt cannot dominate. Only chat requests with one choice are used: a /v1/completions prompt is plain text (not
  a conversation) and a rating of a response with `n` > 1 choices does not say which choice.
- **Human pairwise ratings** of `tuneloop eval` (`ratings.jsonl` of an evaluation folder, from /dashboard/rate or
  the Label Studio import), read with the `outputs.jsonl` beside them: each rated row's votes are counted per pair
  of models; the model with more votes is `chosen`, equal votes (or `tie`) are dropped.

`--since` / `--until` select ratings by the time they were given (not when the answer was served). Everything read
is hashed into the provenance written beside the rows (`tuneloop.artifacts.traffic.PreferenceProvenance`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from tuneloop.artifacts.ratings import TIE, EvaluatedRow, HumanRating
from tuneloop.artifacts.traffic import (
    FeedbackEntry,
    FeedbackWindow,
    JsonlLine,
    PreferenceProvenance,
    Record,
    SourceFile,
    SourceKind,
    TrafficRecord,
    scan_jsonl,
)
from tuneloop.errors import DataError
from tuneloop.keys import file_sha256
from tuneloop.workspace import EvalPaths

DEFAULT_MAX_PAIRS_PER_PROMPT = 4
# The counts of the provenance, in the order the summary shows them.
COUNTED = (
    "ratings_read",
    "ratings_in_window",
    "ratings_joined",
    "responses_logged",
    "prompts",
    "human_ratings_read",
    "human_ratings_in_window",
    "human_pairs",
    "pairs",
    "malformed_lines",
)
MALFORMED_KEPT = 100  # skipped lines named in the provenance (all are counted)
RULE = (
    "gateway feedback: ratings scored up=1, down=0, stars n=(n-1)/4, averaged per distinct answer to the same prompt; "
    "of two answers the higher-scored is chosen, equal scores are ties (dropped); at most {cap} pairs per prompt, "
    "widest gap first. human pairwise ratings: the model with more votes on a row is chosen, equal votes dropped."
)


@dataclass
class FeedbackInputs:
    """What `from-feedback` reads: gateway ratings + traffic logs (several replicas: several files each) and human
    rating files of evaluation folders, within [since, until)."""

    feedback: list[Path] = field(default_factory=list)
    traffic: list[Path] = field(default_factory=list)
    ratings: list[Path] = field(default_factory=list)
    since: datetime | None = None
    until: datetime | None = None
    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS_PER_PROMPT


@dataclass
class PreferenceRows:
    rows: list[dict[str, Any]]
    provenance: PreferenceProvenance

    def summary(self, out: Path | None = None) -> dict[str, Any]:
        provenance = self.provenance.model_dump(mode="json")
        provenance["malformed_lines"] = provenance["malformed_lines"][:5]
        return {"out": str(out) if out else None, **provenance}


def provenance_path(out: Path) -> Path:
    """The sidecar of a preference file: `OUT.provenance.json`."""
    return out.with_name(out.name + ".provenance.json")


def score_of(rating: str | int) -> float:
    """A rating on one 0..1 scale: `up` 1, `down` 0, stars n (1-5) (n - 1) / 4."""
    if isinstance(rating, str):
        return 1.0 if rating == "up" else 0.0
    return (rating - 1) / 4


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """Prompts that differ only in letter case of roles or in whitespace are the same prompt."""
    normal = [[str(m.get("role", "")).strip().lower(), " ".join(str(m.get("content", "")).split())] for m in messages]
    return json.dumps(normal, ensure_ascii=False)


def conversation(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The prompt as TRL's conversational layout wants it: role and content only."""
    return [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages]


def iso(moment: float | datetime | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.isoformat(timespec="seconds")


def parse_moment(text: str, option: str) -> datetime:
    """An ISO 8601 date or time for --since/--until; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise DataError(
            f"{option} {text!r} is not an ISO 8601 date or time", hint="e.g. 2026-11-27 or 2026-11-27T08:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class _Candidate:
    """One distinct answer to a prompt: its ratings' scores and the responses that gave it."""

    answer: str
    first_time: float
    response_id: str
    served: str
    scores: list[float] = field(default_factory=list)
    variants: set[str] = field(default_factory=set)

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores)


class _Builder:
    """One pass over the inputs, counting as it goes."""

    def __init__(self, inputs: FeedbackInputs) -> None:
        self.inputs = inputs
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.malformed: list[str] = []
        self.sources: list[SourceFile] = []
        self.rating_times: list[float] = []
        self.variants: set[str] = set()
        self.since = inputs.since.timestamp() if inputs.since else float("-inf")
        self.until = inputs.until.timestamp() if inputs.until else float("inf")

    # -- reading ----------------------------------------------------------------------------------------------------
    def _scan(self, path: Path, kind: type[Record], source: SourceKind, progress: Progress) -> Iterator[Record]:
        """The valid records of a file, with progress; malformed lines counted and named; the file hashed."""
        if not path.is_file():
            raise DataError(f"{path} does not exist (a {source} file)")
        task = progress.add_task(f"{source} {path.name}", total=path.stat().st_size)
        lines = malformed = 0
        line: JsonlLine[Record]
        for line in scan_jsonl(path, kind):
            lines += 1
            progress.advance(task, line.size)
            if line.record is not None:
                yield line.record
            else:
                malformed += 1
                if len(self.malformed) < MALFORMED_KEPT:
                    self.malformed.append(line.malformed or "")
        self.counts["malformed_lines"] += malformed
        digest = file_sha256(path)
        self.sources.append(SourceFile(path=str(path), kind=source, sha256=digest, lines=lines, malformed=malformed))

    def in_window(self, moment: float) -> bool:
        return self.since <= moment < self.until

    # -- gateway feedback -------------------------------------------------------------------------------------------
    def feedback_rows(self, progress: Progress) -> list[dict[str, Any]]:
        scores: dict[str, list[float]] = defaultdict(list)
        for feedback_file in self.inputs.feedback:
            for entry in self._scan(feedback_file, FeedbackEntry, "feedback", progress):
                self.counts["ratings_read"] += 1
                if not self.in_window(entry.time):
                    self.dropped["ratings_outside_window"] += 1
                    continue
                self.counts["ratings_in_window"] += 1
                self.rating_times.append(entry.time)
                scores[entry.response_id].append(score_of(entry.rating))
        if not scores:
            return []
        if not self.inputs.traffic:
            raise DataError(
                "no traffic log to join the ratings to: the gateway logs prompts and answers only with "
                "`serve.log_traffic: true`",
                hint="set serve.log_traffic: true in the config `tuneloop serve` runs with (ratings of answers served "
                "before that cannot be joined), or pass --traffic FILE (one per gateway replica)",
            )
        prompts: dict[str, dict[str, _Candidate]] = {}
        prompt_messages: dict[str, tuple[float, str, list[dict[str, Any]]]] = {}  # the earliest asking of each
        joined: set[str] = set()
        for traffic_file in self.inputs.traffic:
            for record in self._scan(traffic_file, TrafficRecord, "traffic", progress):
                self.counts["responses_logged"] += 1
                rated = scores.get(record.response_id)
                if rated is None:
                    self.dropped["responses_unrated"] += 1
                    continue
                if record.response_id in joined:  # the same line in two files (a copied log): counted once
                    continue
                joined.add(record.response_id)
                self.counts["ratings_joined"] += len(rated)
                if record.messages is None:
                    self.dropped["responses_not_chat"] += 1
                    continue
                if record.other_choices:
                    self.dropped["responses_several_choices"] += 1
                    continue
                key = prompt_key(record.messages)
                earliest = (record.time, record.response_id, record.messages)
                prompt_messages[key] = min(prompt_messages.get(key, earliest), earliest, key=lambda seen: seen[:2])
                self._add_candidate(prompts.setdefault(key, {}), record, rated)
        self.dropped["ratings_missing_traffic"] = sum(len(v) for k, v in scores.items() if k not in joined)
        self.counts["prompts"] = len(prompts)
        rows = []
        # Prompts in the order first asked, whatever the order of the files: the same inputs give the same rows.
        for key in sorted(prompts, key=lambda key: prompt_messages[key][:2]):
            rows.extend(self._pairs(prompt_messages[key][2], list(prompts[key].values())))
        return rows

    def _add_candidate(self, candidates: dict[str, _Candidate], record: TrafficRecord, rated: list[float]) -> None:
        candidate = candidates.get(record.answer)
        if candidate is None:
            candidate = candidates[record.answer] = _Candidate(
                record.answer, record.time, record.response_id, record.served
            )
        elif (record.time, record.response_id) < (candidate.first_time, candidate.response_id):
            candidate.first_time, candidate.response_id = record.time, record.response_id
            candidate.served = record.served
        candidate.scores.extend(rated)
        candidate.variants.add(record.variant or record.served)

    def _pairs(self, messages: list[dict[str, Any]], candidates: list[_Candidate]) -> list[dict[str, Any]]:
        if len(candidates) < 2:
            self.dropped["prompts_without_pair"] += 1
            return []
        ordered = sorted(candidates, key=lambda candidate: (candidate.first_time, candidate.response_id))
        pairs = []
        for first, second in itertools.combinations(ordered, 2):
            if first.score == second.score:
                self.dropped["pairs_tied"] += 1
                continue
            chosen, rejected = (first, second) if first.score > second.score else (second, first)
            pairs.append((chosen, rejected))
        if not pairs:
            self.dropped["prompts_without_pair"] += 1
            return []
        rank = {id(candidate): index for index, candidate in enumerate(ordered)}
        # Widest gap first; then the earliest answers: the same inputs give the same rows.
        pairs.sort(key=lambda pair: (pair[1].score - pair[0].score, rank[id(pair[0])], rank[id(pair[1])]))
        kept = pairs[: self.inputs.max_pairs_per_prompt]
        self.dropped["pairs_over_cap"] += len(pairs) - len(kept)
        rows = []
        for chosen, rejected in kept:
            self.variants.update(chosen.variants | rejected.variants)
            rows.append(
                {
                    "prompt": conversation(messages),
                    "chosen": [{"role": "assistant", "content": chosen.answer}],
                    "rejected": [{"role": "assistant", "content": rejected.answer}],
                    "source": "feedback",
                    "chosen_variant": chosen.served,
                    "rejected_variant": rejected.served,
                    "chosen_score": round(chosen.score, 4),
                    "rejected_score": round(rejected.score, 4),
                    "chosen_response_id": chosen.response_id,
                    "rejected_response_id": rejected.response_id,
                }
            )
        return rows

    # -- human pairwise ratings -------------------------------------------------------------------------------------
    def human_rows(self, progress: Progress) -> list[dict[str, Any]]:
        rows = []
        for ratings_file in self.inputs.ratings:
            outputs_file = EvalPaths(ratings_file.parent).outputs
            votes: dict[tuple[str, frozenset[str]], Counter[str]] = defaultdict(Counter)
            for rating in self._scan(ratings_file, HumanRating, "ratings", progress):
                self.counts["human_ratings_read"] += 1
                if rating.mode != "pairwise" or rating.preference is None or len(rating.labels) != 2:
                    self.dropped["human_ratings_not_pairwise"] += 1
                    continue
                if not self.in_window(rating.time):
                    self.dropped["human_ratings_outside_window"] += 1
                    continue
                self.counts["human_ratings_in_window"] += 1
                self.rating_times.append(rating.time)
                votes[(rating.row_id, rating.labels)][rating.preference] += 1
            if not votes:
                continue
            if not outputs_file.is_file():
                raise DataError(
                    f"{outputs_file} does not exist: the ratings in {ratings_file} name rows of it",
                    hint="pass the ratings.jsonl of a `tuneloop eval` report folder, next to its outputs.jsonl",
                )
            evaluated = {row.id: row for row in self._scan(outputs_file, EvaluatedRow, "outputs", progress)}
            for (row_id, labels), counted in sorted(votes.items(), key=lambda item: (item[0][0], sorted(item[0][1]))):
                row = rated_row(evaluated, row_id, labels)
                if row is None:
                    self.dropped["human_rows_missing"] += 1
                    continue
                first, second = sorted(labels)
                if counted[first] == counted[second]:  # votes for `tie` decide nothing either way
                    self.dropped["human_ties"] += 1
                    continue
                chosen, rejected = (first, second) if counted[first] > counted[second] else (second, first)
                if row.outputs[chosen] == row.outputs[rejected]:
                    self.dropped["human_ties"] += 1
                    continue
                self.variants.update(labels)
                messages = row.messages or [{"role": "user", "content": row.prompt}]
                rows.append(
                    {
                        "prompt": conversation(messages),
                        "chosen": [{"role": "assistant", "content": row.outputs[chosen]}],
                        "rejected": [{"role": "assistant", "content": row.outputs[rejected]}],
                        "source": f"ratings:{ratings_file.parent.name}/{row_id}",
                        "chosen_variant": chosen,
                        "rejected_variant": rejected,
                        "votes": {label: counted[label] for label in (chosen, rejected, TIE) if counted[label]},
                    }
                )
        self.counts["human_pairs"] = len(rows)
        return rows


def rated_row(evaluated: dict[str, EvaluatedRow], row_id: str, labels: frozenset[str]) -> EvaluatedRow | None:
    """The evaluated row a rating names, when it still holds both models' answers."""
    row = evaluated.get(row_id)
    return row if row is not None and labels <= row.outputs.keys() else None


def build_preference_rows(inputs: FeedbackInputs, console: Console | None = None) -> PreferenceRows:
    """The preference rows and their provenance; a DataError when nothing in the window can be used."""
    if not inputs.feedback and not inputs.ratings:
        raise DataError(
            "nothing to read: no feedback file and no human ratings",
            hint="run the gateway and post ratings to /v1/feedback (serve/feedback.jsonl), or pass --feedback FILE "
            "or --ratings EVAL_FOLDER/ratings.jsonl",
        )
    builder = _Builder(inputs)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        transient=True,
        disable=console is None,
    )
    with progress:
        rows = builder.feedback_rows(progress)
        rows += builder.human_rows(progress)
    counts, dropped = builder.counts, builder.dropped
    window = FeedbackWindow(
        since=iso(inputs.since),
        until=iso(inputs.until),
        first_rating=iso(min(builder.rating_times)) if builder.rating_times else None,
        last_rating=iso(max(builder.rating_times)) if builder.rating_times else None,
    )
    if not builder.rating_times:
        read = counts["ratings_read"] + counts["human_ratings_read"]
        raise DataError(
            f"no ratings in the window {window.since or 'beginning'} .. {window.until or 'now'} ({read} read, "
            f"{counts['malformed_lines']} malformed lines)",
            hint="widen --since/--until, or post ratings to /v1/feedback first",
        )
    counts["pairs"] = len(rows)
    provenance = PreferenceProvenance(
        created=iso(datetime.now(UTC)) or "",
        rows=len(rows),
        rule=RULE.format(cap=inputs.max_pairs_per_prompt),
        window=window,
        counts={name: counts[name] for name in COUNTED},
        dropped={reason: count for reason, count in sorted(dropped.items()) if count},
        variants=sorted(builder.variants),
        sources=builder.sources,
        malformed_lines=builder.malformed,
    )
    if not rows:
        reasons = ", ".join(f"{reason} {count}" for reason, count in provenance.dropped.items()) or "none"
        raise DataError(
            f"no preference pairs: {counts['ratings_in_window'] + counts['human_ratings_in_window']} ratings in the "
            f"window, none makes a pair (dropped: {reasons})",
            hint="a pair needs two different answers to the same prompt rated differently: send the same prompt "
            "to both A/B variants (serve.routes) and rate both answers",
        )
    return PreferenceRows(rows, provenance)


def write_preference_rows(result: PreferenceRows, out: Path) -> Path:
    """The rows as JSON Lines at `out` and the provenance at `OUT.provenance.json`, each written whole or not at
    all (a temporary sibling renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in result.rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    temporary.replace(out)
    result.provenance.save(provenance_path(out))
    return out
