"""Builds a Label Studio JSON export with the `label-studio-sdk` package's own types; run by .venv-labelstudio's
Python (the SDK pins numpy below the project's), never imported by the tests.

    python labelstudio_sdk_export.py LABELING_CONFIG.xml TASKS.json PLAN.json OUT.json

It checks the labeling config (`LabelInterface.validate`) and each task's data against it (`validate_task`), builds
every result with the control tag's own `label()`, checks each annotation with `validate_annotation`, and writes the
tasks as Label Studio's JSON export lays them out, each annotation an SDK `Annotation`. PLAN maps a task id to its
annotations: `{"id", "completed_by", "updated_at", "was_cancelled", "ground_truth", "values": {control: value}}`,
where a value is `{"rating": n}`, `{"text": [..]}` or `{"choices": [..]}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.types import Annotation


def build_result(interface: LabelInterface, control: str, value: dict[str, Any]) -> dict[str, Any]:
    tag = interface.get_control(control)
    if "choices" in value:
        region = tag.label(value["choices"])
    elif "rating" in value:
        region = tag.label(rating=value["rating"])
    elif "text" in value:
        region = tag.label(text=value["text"])
    else:
        raise SystemExit(f"unknown value {value} for {control}")
    return json.loads(region.to_json())


def main(config_path: str, tasks_path: str, plan_path: str, out_path: str) -> None:
    interface = LabelInterface(Path(config_path).read_text())
    interface.validate()
    tasks = json.loads(Path(tasks_path).read_text())
    plan = json.loads(Path(plan_path).read_text())
    exported = []
    for task in tasks:
        if not interface.validate_task({"data": task["data"]}):
            raise SystemExit(f"task {task['id']}: its data does not fit the labeling config")
        annotations = []
        for entry in plan.get(str(task["id"]), []):
            result = [build_result(interface, control, value) for control, value in entry.get("values", {}).items()]
            errors = interface._validate_object({"result": result}, return_errors=True)
            if errors:
                raise SystemExit(f"task {task['id']}, annotation {entry['id']}: {errors}")
            annotation = Annotation(
                id=entry["id"],
                completed_by=entry.get("completed_by", 1),
                result=result,
                was_cancelled=entry.get("was_cancelled", False),
                ground_truth=entry.get("ground_truth", False),
                created_at=entry.get("updated_at", "2026-11-01T10:00:00Z"),
                updated_at=entry.get("updated_at", "2026-11-01T10:00:00Z"),
                lead_time=12.5,
                task=task["id"],
                project=1,
            )
            annotations.append(annotation.model_dump(mode="json", exclude_none=True))
        cancelled = sum(1 for annotation in annotations if annotation.get("was_cancelled"))
        exported.append(
            {
                "id": task["id"],
                "annotations": annotations,
                "file_upload": "tasks.json",
                "drafts": [],
                "predictions": [],
                "data": task["data"],
                "meta": {},
                "created_at": "2026-11-01T09:00:00Z",
                "updated_at": "2026-11-01T11:00:00Z",
                "inner_id": task["id"],
                "total_annotations": len(annotations) - cancelled,
                "cancelled_annotations": cancelled,
                "total_predictions": 0,
                "comment_count": 0,
                "unresolved_comment_count": 0,
                "last_comment_updated_at": None,
                "project": 1,
                "updated_by": 1,
                "comment_authors": [],
            }
        )
    Path(out_path).write_text(json.dumps(exported, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
