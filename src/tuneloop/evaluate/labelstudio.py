"""Label Studio round trip for human evaluation, for teams that already annotate there.

`export_tasks` writes an evaluation folder's rows as Label Studio tasks (`labelstudio_tasks.json`: a list of
{"id", "data"}) and the labeling interface (`labelstudio_config.xml`: a Choices tag for the preference, one Rating
per rubric dimension per answer, a TextArea note). The tasks are blind like /dashboard/rate: task order and which
model is A are shuffled (seeded), and the key (task -> row and labels) stays in the folder (`labelstudio_key.json`).

`import_export` reads Label Studio's JSON export (tasks with `annotations[].result[]` items of `from_name`,
`to_name`, `type` and `value`: `{"choices": [..]}`, `{"rating": n}`, `{"text": [..]}`; `completed_by` a user id, or
an object with an e-mail in some exports) into the folder's `ratings.jsonl`, replacing what an earlier import of the
same annotations wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tuneloop.artifacts._json import write_json
from tuneloop.artifacts.labelstudio import annotation_time, annotator, read_export
from tuneloop.artifacts.ratings import (
    HIGHEST_SCORE,
    LOWEST_SCORE,
    TIE,
    EvaluatedRow,
    HumanRating,
    RatingMode,
    blind_positions,
    model_labels,
    read_outputs,
    read_ratings,
    seeded_random,
    write_ratings,
)
from tuneloop.errors import DataError
from tuneloop.workspace import EvalPaths

PREFERENCE = "preference"
NOTE = "note"
SOURCE_PREFIX = "labelstudio:"


@dataclass
class ExportResult:
    tasks: Path
    config: Path
    key: Path
    count: int


@dataclass
class ImportResult:
    ratings: Path
    imported: int
    skipped_cancelled: int
    replaced: int
    raters: list[str]


def export_tasks(
    eval_dir: Path, rubric: dict[str, str], mode: RatingMode = "pairwise", pair: int = 1, seed: int = 0
) -> ExportResult:
    """Tasks, labeling config and key for `eval_dir`; pairwise compares the first model with the `pair`-th other."""
    paths = EvalPaths(eval_dir)
    rows = read_outputs(paths.outputs)
    labels = model_labels(rows)
    if mode == "pairwise":
        if len(labels) < 2:
            raise DataError(f"{paths.outputs} has answers of one model", hint="export with --mode single")
        if not 1 <= pair < len(labels):
            raise DataError(f"--pair must be 1-{len(labels) - 1}, not {pair}")
        compared = [(row, (labels[0], labels[pair])) for row in rows if {labels[0], labels[pair]} <= set(row.outputs)]
    else:
        compared = [(row, (label,)) for row in rows for label in labels if label in row.outputs]
    seeded_random(seed, eval_dir.name, mode, pair).shuffle(compared)
    controls = {_control_name(dimension): dimension for dimension in rubric}
    tasks, items = [], {}
    for number, (row, judged) in enumerate(compared, start=1):
        item = f"t{number:05d}"
        answers = blind_positions(judged, seed, row.id, *judged)
        items[item] = {"row_id": row.id, "answers": answers}
        data = {"item": item, "prompt": _prompt_text(row), "reference": row.reference}
        if mode == "pairwise":
            data |= {"answer_a": row.outputs[answers["A"]], "answer_b": row.outputs[answers["B"]]}
        else:
            data["answer"] = row.outputs[answers["A"]]
        tasks.append({"id": number, "data": data})
    write_json(paths.labelstudio_tasks, tasks)
    paths.labelstudio_config.write_text(labeling_config(rubric, mode), encoding="utf-8")
    write_json(paths.labelstudio_key, {"mode": mode, "pair": pair, "dimensions": controls, "items": items})
    return ExportResult(paths.labelstudio_tasks, paths.labelstudio_config, paths.labelstudio_key, len(tasks))


def labeling_config(rubric: dict[str, str], mode: RatingMode) -> str:
    """The labeling interface: the prompt, the answer(s) each with a 1-5 Rating per rubric dimension, the
    preference (pairwise) and a note."""
    shown = {"A": "answer_a", "B": "answer_b"} if mode == "pairwise" else {"A": "answer"}
    columns = []
    for position, field in shown.items():
        title = f"Answer {position}" if mode == "pairwise" else "Answer"
        ratings = "".join(
            f'      <Header value={quoteattr(f"{dimension} (5 = {meaning})")} size="6"/>\n'
            f'      <Rating name={quoteattr(f"{position}_{_control_name(dimension)}")} toName="{field}" '
            f'maxRating="{HIGHEST_SCORE}" required="true"/>\n'
            for dimension, meaning in rubric.items()
        )
        columns.append(
            '    <View style="flex: 1; min-width: 0">\n'
            f'      <Header value="{title}"/>\n'
            f'      <Text name="{field}" value="${field}"/>\n'
            f"{ratings}"
            "    </View>\n"
        )
    preference = (
        '  <Header value="Which answer is better overall?"/>\n'
        f'  <Choices name="{PREFERENCE}" toName="prompt" choice="single" required="true" showInline="true">\n'
        f'    <Choice value="A"/>\n    <Choice value="B"/>\n    <Choice value="{TIE}"/>\n'
        "  </Choices>\n"
        if mode == "pairwise"
        else ""
    )
    return (
        "<View>\n"
        '  <Header value="Prompt"/>\n'
        '  <Text name="prompt" value="$prompt"/>\n'
        '  <Header value="Reference answer (from the dataset)" size="6"/>\n'
        '  <Text name="reference" value="$reference"/>\n'
        '  <View style="display: flex; gap: 1em">\n'
        f"{''.join(columns)}"
        "  </View>\n"
        f"{preference}"
        '  <Header value="Note (optional)" size="6"/>\n'
        f'  <TextArea name="{NOTE}" toName="prompt" rows="3" editable="true" maxSubmissions="1"/>\n'
        "</View>\n"
    )


def import_export(export_file: Path, eval_dir: Path) -> ImportResult:
    """Label Studio's JSON export of the exported tasks -> the folder's ratings.jsonl (labels resolved by the key)."""
    paths = EvalPaths(eval_dir)
    if not paths.labelstudio_key.exists():
        raise DataError(
            f"no Label Studio key in {eval_dir}", hint="export the tasks with `tuneloop rate export-labelstudio` first"
        )
    key = json.loads(paths.labelstudio_key.read_text(encoding="utf-8"))
    tasks = read_export(export_file)
    ratings, cancelled = [], 0
    for task in tasks:
        item = (task.get("data") or {}).get("item")
        entry = key["items"].get(item)
        if entry is None:
            raise DataError(
                f"{export_file}: task {task.get('id')} (item {item!r}) is not one of the tasks exported to {eval_dir}",
                hint="import into the folder the tasks were exported from",
            )
        for number, annotation in enumerate(task.get("annotations") or []):
            if annotation.get("was_cancelled"):
                cancelled += 1
                continue
            where = f"{export_file}: task {task.get('id')}, annotation {annotation.get('id', number)}"
            source = f"{SOURCE_PREFIX}{item}/{annotation.get('id', number)}"
            ratings.append(_rating(annotation, entry, key, where, source))
    sources = {rating.source for rating in ratings}
    existing = read_ratings(paths.ratings)
    kept = [rating for rating in existing if rating.source not in sources]
    write_ratings(paths.ratings, kept + ratings)
    return ImportResult(
        paths.ratings, len(ratings), cancelled, len(existing) - len(kept), sorted({r.rater for r in ratings})
    )


def _rating(
    annotation: dict[str, Any], entry: dict[str, Any], key: dict[str, Any], where: str, source: str
) -> HumanRating:
    answers: dict[str, str] = entry["answers"]
    mode: RatingMode = key["mode"]
    scores: dict[str, dict[str, int]] = {label: {} for label in answers.values()}
    preference, notes = None, []
    for result in annotation.get("result") or []:
        name, kind, value = result.get("from_name"), result.get("type"), result.get("value") or {}
        if name == PREFERENCE and kind == "choices":
            choice = (value.get("choices") or [None])[0]
            if choice not in (*answers, TIE):
                raise DataError(f"{where}: preference is {choice!r}, not A, B or {TIE}")
            preference = TIE if choice == TIE else answers[choice]
        elif name == NOTE and kind == "textarea":
            notes += [str(text) for text in value.get("text") or []]
        elif kind == "rating":
            position, _, control = str(name).partition("_")
            dimension = key["dimensions"].get(control)
            score = value.get("rating")
            if position not in answers or dimension is None:
                raise DataError(f"{where}: rating {name!r} is not in the exported labeling config")
            if score == 0:  # Label Studio's "no star selected"
                continue
            if not isinstance(score, int) or not LOWEST_SCORE <= score <= HIGHEST_SCORE:
                raise DataError(f"{where}: {name} is {score!r}, not a score {LOWEST_SCORE}-{HIGHEST_SCORE}")
            scores[answers[position]][dimension] = score
    if mode == "pairwise" and preference is None:
        raise DataError(f"{where}: no {PREFERENCE} chosen", hint="the labeling config makes it required")
    return HumanRating(
        time=annotation_time(annotation),
        rater=annotator(annotation.get("completed_by")),
        row_id=entry["row_id"],
        mode=mode,
        answers=answers,
        preference=preference,
        scores={label: by_dimension for label, by_dimension in scores.items() if by_dimension},
        note="\n".join(notes).strip(),
        source=source,
    )


def _prompt_text(row: EvaluatedRow) -> str:
    turns = list(row.messages)
    if turns and turns[-1].get("role") == "assistant":  # the reference, shown apart
        turns = turns[:-1]
    if len(turns) <= 1:
        return row.prompt or (str(turns[0].get("content", "")) if turns else "")
    return "\n\n".join(f"{turn.get('role', '')}: {turn.get('content', '')}" for turn in turns)


def _control_name(dimension: str) -> str:
    """A control tag name from a rubric dimension (letters, digits, underscores)."""
    return re.sub(r"\W+", "_", dimension).strip("_") or "dimension"
