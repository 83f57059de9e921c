"""Label Studio as an annotation step of the data pipeline: rows or model outputs out as tasks, annotations back in
as training rows.

Export (`export_tasks`): a prepared dataset (its folder: the conversations of both splits), any file the data pipeline
reads (the last assistant turn is the answer), an evaluation's `outputs.jsonl` (answers by model label) or the
gateway's traffic log (`answer`, plus `other_choices` when a request asked for n > 1) become `tasks.json` and
`labeling_config.xml` in one folder, for one of two labeling modes:

- `correct`: the annotator rates the answer (1-5) and corrects it in a text area that starts as the answer;
- `pairwise`: the annotator picks the better of two answers (A, B or tie; which is A is shuffled, seeded).

Task data: `prompt` (the conversation so far, as text, for display), `messages` (the same turns, kept to rebuild the
row), `answer` or `answer_a`/`answer_b`, `row_id` and `tuneloop_mode`.

Import (`rows_from_export`, also what `data.sources` calls when a data source is a Label Studio JSON export): each
task becomes at most one row, by these rules:

- skipped (`was_cancelled`) annotations are dropped and counted; a task with no submitted annotation yields no row;
- several annotators on one task: a `ground_truth` annotation decides alone; otherwise `correct` takes the most
  recently updated annotation, and `pairwise` the majority of A-vs-B votes (ties and an even split yield no row);
- `correct` -> an SFT row `{"messages": prompt + [assistant: text]}`: the corrected text when it differs from the
  answer, else the answer itself when it was rated at least `ACCEPT_RATING`; a lower-rated, uncorrected answer
  yields no row;
- `pairwise` -> a preference row `{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}`.

Results are read by control name and type: `rating` (Rating), `correct_answer` (TextArea), `preference` (Choices
A/B/tie); Label Studio's Pairwise tag (`{"selected": "left" | "right"}`) counts as A/B too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

from tuneloop.artifacts._json import write_json
from tuneloop.artifacts.labelstudio import (
    annotation_time,
    annotations,
    conversation_text,
    is_task,
    read_export,
    results,
    task_name,
)
from tuneloop.artifacts.ratings import HIGHEST_SCORE, seeded_random
from tuneloop.errors import DataError
from tuneloop.workspace import DatasetPaths

LabelingMode = Literal["correct", "pairwise"]
LABELING_MODES: tuple[LabelingMode, ...] = ("correct", "pairwise")
TASKS_FILE = "tasks.json"
CONFIG_FILE = "labeling_config.xml"

# Control tag names in the labeling configs; the import reads results by them.
RATING = "rating"
CORRECTION = "correct_answer"
PREFERENCE = "preference"
TIE_CHOICE = "Tie"
# An uncorrected answer needs at least this rating (of 5) to become a training row.
ACCEPT_RATING = 4


@dataclass
class LabelingItem:
    """One thing to annotate: the prompt turns and one answer (`correct`) or two (`pairwise`)."""

    row_id: str
    prompt: list[dict[str, Any]]
    answers: list[str]


@dataclass
class ExportResult:
    tasks: Path
    config: Path
    count: int
    mode: LabelingMode


@dataclass
class ImportCounts:
    """What an import kept and dropped, and why."""

    tasks: int = 0
    rows: Counter[str] = field(default_factory=Counter)  # "sft" / "preference"
    cancelled_annotations: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> tasks

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "sft_rows": self.rows["sft"],
            "preference_rows": self.rows["preference"],
            "cancelled_annotations": self.cancelled_annotations,
            "dropped_tasks": dict(self.dropped),
        }


class TaskDropped(Exception):
    """A task that yields no row: `reason` is a short key, the message says which task and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- export ---------------------------------------------------------------------------------------------------------


def export_tasks(
    source: Path,
    out_dir: Path,
    mode: LabelingMode,
    models: list[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ExportResult:
    """Write `tasks.json` and `labeling_config.xml` for the rows of `source` into `out_dir`."""
    items = read_items(source, mode, models)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DataError(f"{source}: no rows to export", hint="check the file, or --models for outputs.jsonl")
    tasks = []
    for number, item in enumerate(items, start=1):
        data: dict[str, Any] = {
            "tuneloop_mode": mode,
            "row_id": item.row_id,
            "prompt": conversation_text(item.prompt),
            "messages": item.prompt,
        }
        if mode == "pairwise":
            first, second = item.answers[:2]
            if seeded_random(seed, item.row_id, "labelstudio-data").random() < 0.5:  # no position bias
                first, second = second, first
            data |= {"answer_a": first, "answer_b": second}
        else:
            data["answer"] = item.answers[0]
        tasks.append({"id": number, "data": data})
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks_path, config_path = out_dir / TASKS_FILE, out_dir / CONFIG_FILE
    write_json(tasks_path, tasks)
    config_path.write_text(labeling_config(mode), encoding="utf-8")
    return ExportResult(tasks_path, config_path, len(tasks), mode)


def labeling_config(mode: LabelingMode) -> str:
    """The labeling interface of `mode` (Label Studio's XML)."""
    prompt = '  <Header value="Prompt"/>\n  <Text name="prompt" value="$prompt"/>\n'
    if mode == "pairwise":
        return (
            "<View>\n"
            f"{prompt}"
            '  <View style="display: flex; gap: 1em">\n'
            '    <View style="flex: 1; min-width: 0">\n'
            '      <Header value="Answer A"/>\n      <Text name="answer_a" value="$answer_a"/>\n'
            "    </View>\n"
            '    <View style="flex: 1; min-width: 0">\n'
            '      <Header value="Answer B"/>\n      <Text name="answer_b" value="$answer_b"/>\n'
            "    </View>\n"
            "  </View>\n"
            '  <Header value="Which answer is better?"/>\n'
            f'  <Choices name="{PREFERENCE}" toName="prompt" choice="single" required="true" showInline="true">\n'
            f'    <Choice value="A"/>\n    <Choice value="B"/>\n    <Choice value={quoteattr(TIE_CHOICE)}/>\n'
            "  </Choices>\n"
            "</View>\n"
        )
    return (
        "<View>\n"
        f"{prompt}"
        '  <Header value="Answer"/>\n'
        '  <Text name="answer" value="$answer"/>\n'
        f'  <Header value="How good is the answer? ({ACCEPT_RATING}+ keeps it as it is)" size="6"/>\n'
        f'  <Rating name="{RATING}" toName="answer" maxRating="{HIGHEST_SCORE}" required="true"/>\n'
        '  <Header value="Corrected answer (edit it; leave it as it is when the answer is right)" size="6"/>\n'
        f'  <TextArea name="{CORRECTION}" toName="answer" value="$answer" rows="8" editable="true" '
        'maxSubmissions="1" transcription="true"/>\n'
        "</View>\n"
    )


def read_items(source: Path, mode: LabelingMode, models: list[str] | None = None) -> list[LabelingItem]:
    """The prompts and answers of an eval `outputs.jsonl`, a traffic log, or any file the data pipeline reads."""
    wanted = 2 if mode == "pairwise" else 1
    if source.is_dir():  # a prepared dataset: its conversations, both splits
        dataset = DatasetPaths(source)
        splits = [dataset.conversations(split) for split in ("train", "val")]
        if not splits[0].exists():
            raise DataError(f"{source} is not a prepared dataset (no {splits[0].name})", hint="pass a data file")
        return [item for split in splits if split.exists() for item in read_items(split, mode, models)]
    first = _first_record(source)
    if isinstance(first, dict) and isinstance(first.get("outputs"), dict):
        return _items_from_outputs(source, wanted, models)
    if isinstance(first, dict) and "answer" in first and ("messages" in first or "prompt" in first):
        return _items_from_traffic(source, wanted)
    if mode == "pairwise":
        raise DataError(
            f"{source}: pairwise tasks need two answers per prompt",
            hint="export an evaluation's outputs.jsonl of two models (--models A,B), or a traffic log of n > 1 requests",
        )
    return _items_from_rows(source)


def _first_record(source: Path) -> Any:
    from tuneloop.data.sources import read_records

    for record in read_records(source, limit=1):
        return record.data
    return None


def _items_from_outputs(source: Path, wanted: int, models: list[str] | None) -> list[LabelingItem]:
    from tuneloop.artifacts.ratings import model_labels, read_outputs

    rows = read_outputs(source)
    labels = models or model_labels(rows)[:wanted]
    if len(labels) != wanted:
        raise DataError(
            f"{source} has answers of {', '.join(model_labels(rows))}: name {wanted} with --models",
            hint="e.g. --models tuned,base",
        )
    items = []
    for row in rows:
        if not set(labels) <= set(row.outputs):
            continue
        turns = list(row.messages)
        if turns and turns[-1].get("role") == "assistant":  # the reference answer, not part of the prompt
            turns = turns[:-1]
        prompt = [_turn(turn) for turn in turns] or [{"role": "user", "content": row.prompt}]
        items.append(LabelingItem(row.id, prompt, [row.outputs[label] for label in labels]))
    return items


def _items_from_traffic(source: Path, wanted: int) -> list[LabelingItem]:
    from tuneloop.data.sources import read_records

    items = []
    for record in read_records(source):
        row = record.data
        if record.error is not None or not isinstance(row, dict):
            continue
        answers = [str(row.get("answer", ""))] + [str(choice) for choice in row.get("other_choices") or []]
        if len(answers) < wanted:
            continue
        prompt = [_turn(turn) for turn in row.get("messages") or []] or [
            {"role": "user", "content": str(row.get("prompt", ""))}
        ]
        items.append(LabelingItem(str(row.get("response_id") or record.location), prompt, answers[:wanted]))
    return items


def _items_from_rows(source: Path) -> list[LabelingItem]:
    """Rows of any SFT format: the turns before the last assistant turn are the prompt, that turn the answer."""
    from tuneloop.config import SourceConfig
    from tuneloop.data.formats import RowError, detect_format, normalise
    from tuneloop.data.sources import read_records

    records = [record for record in read_records(source) if record.error is None]
    fmt = detect_format((record.data for record in records[:200]), str(source))
    config = SourceConfig(path=str(source))
    items = []
    for record in records:
        try:
            messages, kind = normalise(record.data, fmt, config)
        except RowError:
            continue
        last = max((n for n, message in enumerate(messages) if message.role == "assistant"), default=None)
        if kind != "chat" or last is None:
            continue
        prompt = [{"role": message.role, "content": message.content} for message in messages[:last]]
        items.append(LabelingItem(record.location, prompt, [messages[last].content]))
    return items


def _turn(turn: dict[str, Any]) -> dict[str, Any]:
    return {"role": str(turn.get("role", "user")), "content": turn.get("content", "")}


# -- import ---------------------------------------------------------------------------------------------------------


def rows_from_export(path: Path) -> tuple[list[dict[str, Any]], ImportCounts]:
    """Every usable row of a Label Studio JSON export, and the counts of what was kept and dropped."""
    counts = ImportCounts()
    rows = []
    for task in read_export(path):
        counts.tasks += 1
        counts.cancelled_annotations += annotations(task)[1]
        try:
            row = row_from_task(task)
        except TaskDropped as dropped:
            counts.dropped[dropped.reason] += 1
            continue
        counts.rows["preference" if "chosen" in row else "sft"] += 1
        rows.append(row)
    return rows, counts


def is_export(records: list[Any]) -> bool:
    """Whether records read from a file (its first ones suffice) are Label Studio tasks: how `data.sources`
    recognises an export."""
    return bool(records) and all(is_task(record) for record in records)


def row_from_task(task: dict[str, Any]) -> dict[str, Any]:
    """One exported task -> an SFT or preference row; TaskDropped when it yields none (or is malformed)."""
    if not is_task(task):
        raise TaskDropped("malformed", "not a Label Studio task (an object with `data` and `annotations`)")
    name = task_name(task)
    data = task["data"]
    try:
        submitted, cancelled = annotations(task)
    except DataError as error:
        raise TaskDropped("malformed", error.message) from None
    if not submitted:
        reason = "skipped" if cancelled else "unlabeled"
        why = f"every annotation ({cancelled}) was skipped" if cancelled else "it has no annotation"
        raise TaskDropped(reason, f"{name}: {why}")
    prompt = _prompt_of(data, name)
    decisive = [annotation for annotation in submitted if annotation.get("ground_truth")] or submitted
    if "answer_a" in data or "answer_b" in data:
        return _preference_row(task, prompt, decisive)
    if "answer" not in data:
        raise TaskDropped("malformed", f"{name}: its data has neither `answer` nor `answer_a`/`answer_b`")
    return _sft_row(task, prompt, max(decisive, key=annotation_time))


def _prompt_of(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        if not all(isinstance(turn, dict) and "role" in turn and "content" in turn for turn in messages):
            raise TaskDropped("malformed", f"{name}: data.messages is not a list of {{role, content}}")
        return [_turn(turn) for turn in messages]
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskDropped("malformed", f"{name}: its data has no `messages` nor a `prompt` text")
    return [{"role": "user", "content": prompt}]


def _where(task: dict[str, Any], annotation: dict[str, Any]) -> str:
    return f"{task_name(task)}, annotation {annotation.get('id', '?')}"


def _controls(task: dict[str, Any], annotation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The annotation's result items by control name (the exporter's names)."""
    try:
        items = results(annotation, _where(task, annotation))
    except DataError as error:
        raise TaskDropped("malformed", error.message) from None
    return {str(item["from_name"]): item for item in items}


def _sft_row(task: dict[str, Any], prompt: list[dict[str, Any]], annotation: dict[str, Any]) -> dict[str, Any]:
    where = _where(task, annotation)
    answer = str(task["data"]["answer"])
    controls = _controls(task, annotation)
    corrected = None
    if CORRECTION in controls:
        texts = controls[CORRECTION]["value"].get("text")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise TaskDropped("malformed", f"{where}: {CORRECTION} has no text list (value.text)")
        corrected = "\n".join(texts).strip() or None
    rating = None
    if RATING in controls:
        rating = controls[RATING]["value"].get("rating")
        if not isinstance(rating, int) or not 0 <= rating <= HIGHEST_SCORE:
            raise TaskDropped("malformed", f"{where}: {RATING} is {rating!r}, not 1-{HIGHEST_SCORE}")
    if corrected is not None and corrected != answer.strip():
        text = corrected
    elif rating is not None and rating >= ACCEPT_RATING:
        text = answer
    else:
        shown = "no rating" if not rating else f"rated {rating}"
        raise TaskDropped("rejected", f"{where}: the answer was {shown} and not corrected")
    return {"messages": [*prompt, {"role": "assistant", "content": text}]}


def _preference_row(
    task: dict[str, Any], prompt: list[dict[str, Any]], decisive: list[dict[str, Any]]
) -> dict[str, Any]:
    data = task["data"]
    votes: Counter[str] = Counter()
    for annotation in decisive:
        votes[_vote(task, annotation)] += 1
    if votes["A"] == votes["B"]:
        raise TaskDropped("tie", f"{task_name(task)}: no majority for A or B ({dict(votes)})")
    winner, loser = ("answer_a", "answer_b") if votes["A"] > votes["B"] else ("answer_b", "answer_a")
    for key in (winner, loser):
        if not isinstance(data.get(key), str):
            raise TaskDropped("malformed", f"{task_name(task)}: data.{key} is not a text")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": data[winner]}],
        "rejected": [{"role": "assistant", "content": data[loser]}],
    }


def _vote(task: dict[str, Any], annotation: dict[str, Any]) -> str:
    """`A`, `B` or `tie` from a Choices result (A/B/Tie) or a Pairwise one (left/right)."""
    where = _where(task, annotation)
    for item in _controls(task, annotation).values():
        if item["type"] == "choices" and item["from_name"] == PREFERENCE:
            choices = item["value"].get("choices")
            choice = choices[0] if isinstance(choices, list) and len(choices) == 1 else choices
            if choice in ("A", "B"):
                return str(choice)
            if isinstance(choice, str) and choice.lower() == TIE_CHOICE.lower():
                return "tie"
            raise TaskDropped("malformed", f"{where}: {PREFERENCE} is {choice!r}, not A, B or {TIE_CHOICE}")
        if item["type"] == "pairwise":
            selected = item["value"].get("selected")
            if selected in ("left", "right"):
                return "A" if selected == "left" else "B"
            raise TaskDropped("malformed", f"{where}: pairwise selected {selected!r}, not left or right")
    raise TaskDropped("malformed", f"{where}: no {PREFERENCE} choice (nor a Pairwise result)")


def converted_records(tasks: list[Any]) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """For `data.sources`: each task's row, or None and why it yields none (the quarantine's detail)."""
    for task in tasks:
        try:
            yield row_from_task(task), None
        except TaskDropped as dropped:
            yield None, f"{dropped} [{dropped.reason}]"


def write_rows(rows: list[dict[str, Any]], out: Path) -> Path:
    """The imported rows as JSON Lines (a data source of its own)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return out
