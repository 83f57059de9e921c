"""Blind A/B preference sheets (base vs tuned) and the preference rate from imported ratings.

`write_sheet` shuffles which model is A per row (seeded) and keeps the key in a separate file, so raters (people,
or an LLM judge) never see which answer came from which model. `import_ratings` reads a CSV/JSONL with `id` and
`preference` (A, B or tie) and returns the tuned model's win rate (ties count half) with a Wilson 95% interval.

This is the spreadsheet path (`tuneloop eval --pairwise` / `--import-ratings`). Rubric scores, several raters and
their agreement come from the browser page (/dashboard/rate) or Label Studio instead: see `evaluate.human`.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from tuneloop.errors import DataError
from tuneloop.stats import wilson_interval
from tuneloop.workspace import EvalPaths


def write_sheet(
    out: EvalPaths, prompts: list[str], first: list[str], second: list[str], labels: tuple[str, str], seed: int = 0
) -> dict[str, Path]:
    rng = random.Random(seed)
    key: dict[str, dict[str, str]] = {}
    rows = []
    for index, (prompt, answer_first, answer_second) in enumerate(zip(prompts, first, second, strict=True)):
        row_id = f"p{index:04d}"
        swap = rng.random() < 0.5
        a, b = (answer_second, answer_first) if swap else (answer_first, answer_second)
        key[row_id] = {"A": labels[1] if swap else labels[0], "B": labels[0] if swap else labels[1]}
        rows.append({"id": row_id, "prompt": prompt, "answer_a": a, "answer_b": b, "preference": ""})
    with out.pairwise_sheet.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "answer_a", "answer_b", "preference"])
        writer.writeheader()
        writer.writerows(rows)
    with out.pairwise_jsonl.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.pairwise_key.write_text(json.dumps(key, indent=2), encoding="utf-8")
    return {"sheet": out.pairwise_sheet, "jsonl": out.pairwise_jsonl, "key": out.pairwise_key}


def import_ratings(ratings_file: Path, key_file: Path | None = None, model: str = "tuned") -> dict[str, Any]:
    key_file = key_file or EvalPaths(ratings_file.parent).pairwise_key
    if not key_file.exists():
        raise DataError(
            f"no answer key next to {ratings_file}", hint=f"pass the {key_file.name} written with the sheet"
        )
    key = json.loads(key_file.read_text(encoding="utf-8"))
    ratings = _read_ratings(ratings_file)
    wins = ties = losses = 0
    for row_id, preference in ratings.items():
        choice = preference.strip().upper()
        if row_id not in key or choice not in ("A", "B", "TIE"):
            continue
        if choice == "TIE":
            ties += 1
        elif key[row_id][choice] == model:
            wins += 1
        else:
            losses += 1
    rated = wins + ties + losses
    if rated == 0:
        raise DataError(f"{ratings_file}: no usable ratings", hint="fill the `preference` column with A, B or tie")
    rate = (wins + 0.5 * ties) / rated
    low, high = wilson_interval(rate, rated)
    return {
        "model": model,
        "rated": rated,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "preference_rate": rate,
        "ci95": [low, high],
    }


def _read_ratings(path: Path) -> dict[str, str]:
    if not path.exists():
        raise DataError(f"ratings file not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    return {str(row["id"]): str(row.get("preference") or "") for row in rows}
