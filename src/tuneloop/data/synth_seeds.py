"""Seed rows for `tuneloop data synth`: any file the data pipeline reads, as tasks with their place in the file.

Rows are read with `sources.read_records` and column-mapped with `formats.prepare_record`; conversations
(`messages`, `conversations`) go through `formats.normalise`, so roles and content parts read exactly as in
`tuneloop data prepare`. Unlike preparation, a row needs no answer: `answer` mode exists to write them. A
conversation gives its last user turn (and the assistant turn after it, if any).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import SourceConfig
from tuneloop.data.formats import Message, RowError, Sample, normalise, prepare_record
from tuneloop.data.sources import read_records
from tuneloop.data.synth_prompts import Task
from tuneloop.errors import DataError

_SEED_SOURCE = SourceConfig(path="-")


@dataclass(frozen=True)
class SeedTask:
    task: Task
    output: str | None  # the seed's own answer, when it has one
    row: int  # 1-based record number in the seed file
    line: int | None  # 1-based line, where the file has lines

    def sample(self, source: str) -> Sample:
        """The seed as the data pipeline's conversation (for deduplication against generated rows)."""
        messages = [Message("user", self.task.user_text())]
        if self.output is not None:
            messages.append(Message("assistant", self.output, train=True))
        return Sample(messages, "chat", source, self.row, self.line)


@dataclass
class SeedSet:
    path: Path
    tasks: list[SeedTask]
    rows_read: int
    unusable: Counter[str] = field(default_factory=Counter)  # reason -> rows
    first_problem: str | None = None  # `file:line: reason`, for the error when no row is usable


def read_seed_tasks(path: Path) -> SeedSet:
    """Every usable row of `path`; a missing or empty file, or one without a single usable row, is a `DataError`
    naming `--seed-data`."""
    if not path.exists():
        raise DataError(f"--seed-data {path}: no such file or folder", hint="check the path")
    seeds = SeedSet(path, [], 0)
    for record in read_records(path):
        seeds.rows_read += 1
        try:
            if record.error is not None:
                raise RowError("malformed", record.error)
            task, output = seed_task(prepare_record(record.data, _SEED_SOURCE))
        except RowError as error:
            seeds.unusable[error.reason] += 1
            seeds.first_problem = seeds.first_problem or f"{record.location}: {error.detail}"
            continue
        seeds.tasks.append(SeedTask(task, output, record.row, record.line))
    if not seeds.tasks:
        raise DataError(
            f"--seed-data {path}: none of its {seeds.rows_read} rows is a usable task"
            + (f" (first: {seeds.first_problem})" if seeds.first_problem else ""),
            hint="rows need `instruction` (+ `input`, `output`), `prompt` (+ `completion`), `messages`, "
            "`conversations` or `text`",
        )
    return seeds


def seed_task(row: dict[str, Any]) -> tuple[Task, str | None]:
    """(task, answer or None) of one column-mapped row."""
    instances = row.get("instances")
    if "instruction" in row and isinstance(instances, list) and instances and isinstance(instances[0], dict):
        # Self-Instruct's seed_tasks.jsonl: one instruction, its worked examples under `instances`.
        row = {**row, "input": instances[0].get("input"), "output": instances[0].get("output")}
    if "instruction" in row:
        output = _text(row, "output", required=False)
        return Task(_text(row, "instruction"), _text(row, "input", required=False) or ""), output or None
    if "prompt" in row and isinstance(row["prompt"], str):
        output = _text(row, "completion" if "completion" in row else "response", required=False)
        return Task(_text(row, "prompt")), output or None
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt")):
        if key in row:
            return _from_conversation(row, fmt)
    if "text" in row:
        return Task(_text(row, "text")), None
    raise RowError(
        "missing_field",
        f"no instruction, prompt, messages, conversations or text field (columns: {', '.join(sorted(row)) or 'none'})",
    )


def _from_conversation(row: dict[str, Any], fmt: str) -> tuple[Task, str | None]:
    try:
        messages, _ = normalise(row, fmt, _SEED_SOURCE)
    except RowError as error:
        if error.reason != "missing_field" or "no assistant turn" not in error.detail:
            raise
        # An unlabeled conversation: normalise with a placeholder answer, then set it aside.
        key = "messages" if fmt == "messages" else "conversations"
        role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
        placeholder = {role_key: "assistant", content_key: ""}
        messages = normalise({**row, key: [*row[key], placeholder]}, fmt, _SEED_SOURCE)[0][:-1]
    answer = messages[-1].content if messages[-1].role == "assistant" else None
    users = [message for message in messages if message.role == "user"]
    if not users or not users[-1].content.strip():
        raise RowError("missing_field", "the conversation has no user turn to take as the task")
    return Task(users[-1].content.strip()), answer


def _text(row: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError("missing_field", f"field {key!r} is missing or empty")
        return None
    if not isinstance(value, str):
        raise RowError("malformed", f"field {key!r} must be text, got {type(value).__name__}")
    return value.strip()
