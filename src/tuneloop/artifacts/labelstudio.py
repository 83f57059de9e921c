"""Label Studio's file formats, shared by the human-evaluation round trip (`evaluate.labelstudio`) and the
annotation-as-data round trip (`data.labelstudio`).

Tasks file (what Label Studio imports): a JSON list of `{"id", "data": {...}}`; the labeling config refers to data
fields as `$field`. JSON export (what Label Studio's "Export -> JSON" writes): the same tasks with
`annotations: [{id, completed_by, was_cancelled, ground_truth, created_at, updated_at, result: [...]}]`; each result
item has `from_name` (the control tag), `to_name` (the object tag), `type` (`choices`, `rating`, `textarea`,
`pairwise`, ...) and `value` (`{"choices": [..]}`, `{"rating": n}`, `{"text": [..]}`, `{"selected": "left"}`).
`completed_by` is a user id, or a user object with an e-mail in some exports.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneloop.errors import DataError


def read_export(path: Path) -> list[dict[str, Any]]:
    """The tasks of a Label Studio JSON export; a DataError naming the file (or the task) when it is not one."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except ValueError as error:
        raise DataError(f"{path} is not JSON: {error}") from None
    if not isinstance(tasks, list):
        raise DataError(f"{path} is not a Label Studio JSON export", hint="export the project as JSON (a list)")
    for position, task in enumerate(tasks, start=1):
        if not is_task(task):
            named = f" (id {task['id']})" if isinstance(task, dict) and "id" in task else ""
            raise DataError(
                f"{path}: item {position}{named} is not a Label Studio task (an object with `data` and `annotations`)",
                hint="export the project with Label Studio's JSON format, not JSON-MIN or CSV",
            )
    return tasks


def is_task(record: Any) -> bool:
    """Whether a record has the layout of an exported Label Studio task."""
    return isinstance(record, dict) and isinstance(record.get("data"), dict) and "annotations" in record


def task_name(task: dict[str, Any]) -> str:
    """How messages name a task: its Label Studio id."""
    return f"Label Studio task {task.get('id', '?')}"


def annotations(task: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A task's submitted annotations and how many were skipped/cancelled (`was_cancelled`)."""
    given = task.get("annotations") or []
    if not isinstance(given, list):
        raise DataError(f"{task_name(task)}: `annotations` is not a list")
    kept = [annotation for annotation in given if isinstance(annotation, dict) and not annotation.get("was_cancelled")]
    return kept, len(given) - len(kept)


def results(annotation: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """An annotation's result items, each checked to be an object with `from_name`, `type` and `value`."""
    items = annotation.get("result")
    if not isinstance(items, list):
        raise DataError(f"{where}: `result` is not a list")
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not {"from_name", "type", "value"} <= set(item):
            raise DataError(f"{where}: result {number} lacks from_name, type or value")
        if not isinstance(item["value"], dict):
            raise DataError(f"{where}: result {number} ({item['from_name']}) has a value that is not an object")
    return items


def annotator(completed_by: Any) -> str:
    """Label Studio's user id (an int), or the user object some exports carry: the e-mail when there is one."""
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or f"labelstudio-user-{completed_by.get('id')}")
    return f"labelstudio-user-{completed_by}"


def annotation_time(annotation: dict[str, Any]) -> float:
    """When an annotation was last changed (epoch seconds): `updated_at`, else `created_at`, else now."""
    for field in ("updated_at", "created_at"):
        stamp = annotation.get(field)
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return time.time()


def conversation_text(messages: list[dict[str, Any]]) -> str:
    """A prompt's turns as one text for a Text tag: the lone user turn as is, several turns `role: content`."""
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{turn.get('role', '')}: {turn.get('content', '')}" for turn in messages)
