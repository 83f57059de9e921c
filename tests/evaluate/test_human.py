"""Human evaluation: aggregation against known values (t-interval, Wilson, Krippendorff's alpha), the report merged
into metrics.json / report.md / MLflow, the Label Studio round trip in its documented export format, and the old
CSV sheet flow."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.ratings import HumanRating, append_rating, read_ratings
from tuneloop.artifacts.training import RunRecord
from tuneloop.cli import app
from tuneloop.config import DEFAULT_RUBRIC
from tuneloop.errors import DataError
from tuneloop.evaluate.human import aggregate, human_report, krippendorff_alpha, t_interval
from tuneloop.evaluate.labelstudio import export_tasks, import_export
from tuneloop.evaluate.pairwise import import_ratings, write_sheet
from tuneloop.stats import wilson_interval
from tuneloop.workspace import EvalPaths, Workspace

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units, with
# missing values; the paper's alphas are 0.743 (nominal), 0.815 (ordinal), 0.849 (interval).
PAPER_DATA = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def paper_units() -> dict[int, dict[str, int]]:
    units: dict[int, dict[str, int]] = {}
    for observer, values in enumerate(PAPER_DATA):
        for unit, value in enumerate(values):
            if value is not None:
                units.setdefault(unit, {})[f"observer-{observer}"] = value
    return units


@pytest.mark.parametrize(("level", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_alpha_matches_the_paper(level: str, published: float) -> None:
    assert krippendorff_alpha(paper_units(), level) == pytest.approx(published, abs=5e-4)  # type: ignore[arg-type]


def test_krippendorff_alpha_matches_the_krippendorff_package() -> None:
    krippendorff = pytest.importorskip("krippendorff")  # GPL-3: a test reference only, not a dependency
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in PAPER_DATA], dtype=float)
    for level in ("nominal", "ordinal", "interval"):
        expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        assert krippendorff_alpha(paper_units(), level) == pytest.approx(expected, abs=1e-12)  # type: ignore[arg-type]


def test_krippendorff_alpha_undefined_cases() -> None:
    assert krippendorff_alpha({"u1": {"r1": 3}, "u2": {"r2": 4}}, "ordinal") is None  # nobody shares a unit
    assert krippendorff_alpha({"u1": {"r1": 3, "r2": 3}, "u2": {"r1": 3, "r2": 3}}, "ordinal") is None  # no variation
    perfect = {"u1": {"r1": "a", "r2": "a"}, "u2": {"r1": "b", "r2": "b"}}
    assert krippendorff_alpha(perfect, "nominal") == 1.0


def test_t_interval_known_values() -> None:
    mean, low, high = t_interval([3.0, 4.0, 5.0])
    # sd 1, n 3: t(0.975, 2) = 4.302653 -> margin 4.302653 / sqrt(3) = 2.484138
    assert mean == 4.0
    assert low == pytest.approx(4 - 2.484138, abs=1e-5) and high == pytest.approx(4 + 2.484138, abs=1e-5)
    assert t_interval([2.0]) == (2.0, None, None)


def rating(
    rater: str, row: str, a: str, b: str, preference: str | None, scores: dict, when: float = 0.0
) -> HumanRating:
    return HumanRating(
        time=when,
        rater=rater,
        row_id=row,
        mode="pairwise" if b else "single",
        answers={"A": a, "B": b} if b else {"A": a},
        preference=preference,
        scores=scores,
    )


def two_rater_ratings() -> list[HumanRating]:
    """alice and bob judge rows r0-r3 (tuned vs base) on helpfulness and safety."""
    plan = {
        # row: (alice prefers, alice tuned/base helpfulness, bob prefers, bob tuned/base helpfulness)
        "r0": ("tuned", (5, 2), "tuned", (4, 2)),
        "r1": ("tuned", (4, 3), "tie", (3, 3)),
        "r2": ("base", (2, 4), "base", (2, 5)),
        "r3": ("tuned", (5, 1), "tuned", (5, 2)),
    }
    ratings = []
    for row, (alice_pref, alice_help, bob_pref, bob_help) in plan.items():
        for rater, preference, (tuned, base) in (("alice", alice_pref, alice_help), ("bob", bob_pref, bob_help)):
            scores = {"tuned": {"helpfulness": tuned, "safety": 5}, "base": {"helpfulness": base, "safety": 4}}
            ratings.append(rating(rater, row, "base", "tuned", preference, scores))
    return ratings


def test_aggregate_means_intervals_win_rate_and_agreement() -> None:
    summary = aggregate(two_rater_ratings(), ["tuned", "base"], ["helpfulness", "safety"])
    tuned, base = summary.metrics["tuned"], summary.metrics["base"]
    # Row means of tuned helpfulness: 4.5, 3.5, 2, 5 -> mean 3.75
    row_means = [4.5, 3.5, 2.0, 5.0]
    assert tuned["human_helpfulness_mean"] == pytest.approx(3.75)
    _, low, high = t_interval(row_means)
    assert tuned["human_helpfulness_ci_low"] == pytest.approx(low)
    assert high > 5 and tuned["human_helpfulness_ci_high"] == 5  # clipped to the scale
    assert base["human_helpfulness_mean"] == pytest.approx((2 + 3 + 4.5 + 1.5) / 4)
    assert tuned["human_safety_mean"] == 5.0 and base["human_safety_mean"] == 4.0
    # Overall: each row's mean over dimensions and raters, then over rows.
    assert tuned["human_score_mean"] == pytest.approx(sum((m + 5) / 2 for m in row_means) / 4)
    # Win rate: tuned wins 5 of 8 judgements, 1 tie, 2 losses -> 5.5 / 8.
    assert tuned["human_win_rate"] == pytest.approx(5.5 / 8) and tuned["human_comparisons"] == 8
    assert (tuned["human_win_rate_ci_low"], tuned["human_win_rate_ci_high"]) == pytest.approx(
        wilson_interval(5.5 / 8, 8)
    )
    assert base["human_win_rate"] == pytest.approx(2.5 / 8)
    assert tuned["human_raters"] == 2 and tuned["human_rated_rows"] == 4
    # Agreement: the same units by hand through the (paper-checked) alpha.
    score_units = {}
    for r in two_rater_ratings():
        for label, by_dimension in r.scores.items():
            for dimension, score in by_dimension.items():
                score_units.setdefault((r.row_id, label, dimension), {})[r.rater] = score
    assert tuned["human_agreement_alpha"] == pytest.approx(krippendorff_alpha(score_units, "ordinal"))
    preference_units = {
        row: {"alice": a, "bob": b}
        for row, a, b in [
            ("r0", "tuned", "tuned"),
            ("r1", "tuned", "tie"),
            ("r2", "base", "base"),
            ("r3", "tuned", "tuned"),
        ]
    }
    assert tuned["human_preference_alpha"] == pytest.approx(krippendorff_alpha(preference_units, "nominal"))
    assert 0 < tuned["human_preference_alpha"] < 1


def test_a_later_rating_of_the_same_item_replaces_the_earlier() -> None:
    first = rating("alice", "r0", "tuned", "base", "base", {"tuned": {"helpfulness": 1}}, when=1)
    second = rating("alice", "r0", "base", "tuned", "tuned", {"tuned": {"helpfulness": 5}}, when=2)
    summary = aggregate([second, first], ["tuned", "base"], ["helpfulness"])
    assert summary.metrics["tuned"]["human_helpfulness_mean"] == 5 and summary.metrics["tuned"]["human_win_rate"] == 1
    assert summary.ratings == 1


def eval_folder(root: Path, rows: int = 4) -> EvalPaths:
    paths = EvalPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "id": f"r{i}",
            "prompt": f"question {i}",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "reference": f"reference {i}",
            "outputs": {"tuned": f"good answer {i}", "base": f"weak answer {i}"},
        }
        for i in range(rows)
    ]
    paths.outputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    EvalReport(
        models={"tuned": "run-1", "base": "base"},
        metrics={"tuned": {"rouge_l": 0.5}, "base": {"rouge_l": 0.25}},
        passed=True,
        rows=rows,
        data="val",
        report=str(paths.report_html),
        dir=str(root),
    ).save(paths.metrics)
    paths.report_md.write_text("# Evaluation\n\n## Gates\n\nnone\n")
    return paths


def test_report_merges_metrics_replaces_its_section_and_logs_to_mlflow(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path / "ws")
    run = workspace.run("run-1")
    from tuneloop.tracking import Tracker

    tracker = Tracker.open(workspace, None, "human-test")
    mlflow_run_id = tracker.start_run("run-1", {}, {})
    workspace.ensure(run.root)
    RunRecord(
        run_id="run-1", key="k", status="finished", dataset_id="d", created_at="now", mlflow_run_id=mlflow_run_id
    ).save(run.record)
    run.config.write_text(json.dumps({"project": {"name": "human-test"}}))
    paths = eval_folder(run.evals / "2026-tuned-vs-base")
    for r in two_rater_ratings():
        append_rating(paths.ratings, r)

    outcome = human_report(paths.root)
    assert outcome.mlflow_run_id == mlflow_run_id
    metrics = EvalReport.load(paths.metrics).metrics
    assert metrics["tuned"]["rouge_l"] == 0.5  # kept
    assert metrics["tuned"]["human_win_rate"] == pytest.approx(5.5 / 8)
    assert metrics["base"]["human_helpfulness_mean"] == pytest.approx(2.75)
    logged = tracker.client.get_run(mlflow_run_id).data.metrics
    assert logged["eval.tuned.human_win_rate"] == pytest.approx(5.5 / 8)
    assert logged["eval.base.human_safety_mean"] == 4.0

    human_report(paths.root)  # again: the section is replaced, not appended twice
    text = paths.report_md.read_text()
    assert text.count("## Human evaluation") == 1 and "## Gates" in text
    assert "tuned** preferred over **base** in 68.8% of 8 judgements" in text


def test_report_without_ratings_and_with_a_damaged_line(tmp_path: Path) -> None:
    paths = eval_folder(tmp_path / "evals" / "x")
    with pytest.raises(DataError, match="no ratings"):
        human_report(paths.root)
    paths.ratings.write_text('{"rater": "a"}\n')
    with pytest.raises(DataError, match=r"ratings.jsonl:1 is not a rating"):
        read_ratings(paths.ratings)


def test_rate_report_cli_prints_a_table(tmp_path: Path) -> None:
    paths = eval_folder(tmp_path / "evals" / "x")
    for r in two_rater_ratings():
        append_rating(paths.ratings, r)
    result = CliRunner().invoke(app, ["rate", "report", str(paths.root)])
    assert result.exit_code == 0, result.output
    assert "helpfulness" in result.output and "3.75" in result.output and "68.8%" in result.output
    as_json = CliRunner().invoke(app, ["rate", "report", str(paths.root), "--json"])
    assert json.loads(as_json.stdout)["metrics"]["tuned"]["human_raters"] == 2


def annotation(ident: int, completed_by: object, results: list[dict], cancelled: bool = False) -> dict:
    """One annotation as Label Studio's JSON export writes it (docs: Label Studio JSON format of annotated tasks)."""
    return {
        "id": ident,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2026-11-20T10:00:00.000000Z",
        "updated_at": "2026-11-20T10:00:05.000000Z",
        "lead_time": 5.0,
        "task": 1,
        "completed_by": completed_by,
    }


def result(name: str, to: str, kind: str, value: dict) -> dict:
    return {"id": f"id-{name}", "from_name": name, "to_name": to, "type": kind, "value": value, "origin": "manual"}


def test_labelstudio_round_trip(tmp_path: Path) -> None:
    paths = eval_folder(tmp_path / "evals" / "2026-tuned-vs-base")
    rubric = {"helpfulness": DEFAULT_RUBRIC["helpfulness"], "safety": DEFAULT_RUBRIC["safety"]}
    exported = export_tasks(paths.root, rubric, "pairwise", seed=3)
    tasks = json.loads(exported.tasks.read_text())
    assert exported.count == len(tasks) == 4 and all(set(task) == {"id", "data"} for task in tasks)
    dumped = json.dumps(tasks)
    assert '"tuned"' not in dumped and '"base"' not in dumped  # blind: the key stays in the folder
    config = ElementTree.fromstring(exported.config.read_text())
    assert [c.get("value") for c in config.iter("Choice")] == ["A", "B", "tie"]
    assert sorted(r.get("name") for r in config.iter("Rating")) == [
        "A_helpfulness",
        "A_safety",
        "B_helpfulness",
        "B_safety",
    ]
    assert {r.get("toName") for r in config.iter("Rating")} == {"answer_a", "answer_b"}
    assert [t.get("name") for t in config.iter("TextArea")] == ["note"]
    key = json.loads(paths.labelstudio_key.read_text())["items"]
    assert {entry["answers"]["A"] for entry in key.values()} == {"tuned", "base"}  # shuffled per task

    def tuned_position(task: dict) -> str:
        return "A" if key[task["data"]["item"]]["answers"]["A"] == "tuned" else "B"

    export = []
    for task in tasks:
        good = tuned_position(task)
        weak = "B" if good == "A" else "A"
        field = {"A": "answer_a", "B": "answer_b"}
        results = [
            result("preference", "prompt", "choices", {"choices": [good]}),
            result(f"{good}_helpfulness", field[good], "rating", {"rating": 5}),
            result(f"{weak}_helpfulness", field[weak], "rating", {"rating": 2}),
            result(f"{good}_safety", field[good], "rating", {"rating": 5}),
            result(f"{weak}_safety", field[weak], "rating", {"rating": 4}),
            result("note", "prompt", "textarea", {"text": [f"checked {task['data']['item']}"]}),
        ]
        other = [result("preference", "prompt", "choices", {"choices": ["tie"]}), *results[1:5]]
        export.append(
            {
                "id": 100 + task["id"],  # Label Studio numbers tasks itself
                "data": task["data"],
                "project": 7,
                "annotations": [
                    annotation(task["id"] * 10, 1, results),
                    annotation(task["id"] * 10 + 1, {"id": 2, "email": "bob@example.com"}, other),
                    annotation(task["id"] * 10 + 2, 3, [], cancelled=True),
                ],
                "predictions": [],
            }
        )
    export_file = tmp_path / "project-7-export.json"
    export_file.write_text(json.dumps(export))
    imported = import_export(export_file, paths.root)
    assert (imported.imported, imported.skipped_cancelled, imported.replaced) == (8, 4, 0)
    assert imported.raters == ["bob@example.com", "labelstudio-user-1"]
    again = import_export(export_file, paths.root)  # re-importing replaces, never duplicates
    assert again.replaced == 8 and len(read_ratings(paths.ratings)) == 8

    summary = human_report(paths.root).summary
    tuned, base = summary.metrics["tuned"], summary.metrics["base"]
    assert tuned["human_helpfulness_mean"] == 5 and base["human_helpfulness_mean"] == 2
    assert tuned["human_win_rate"] == pytest.approx(6 / 8)  # user 1 prefers tuned 4x, bob ties 4x
    assert tuned["human_agreement_alpha"] == 1.0  # identical scores from both annotators
    assert any("checked t0000" in note for _, _, note in summary.notes)


def test_labelstudio_import_names_bad_input(tmp_path: Path) -> None:
    paths = eval_folder(tmp_path / "evals" / "x")
    export_file = tmp_path / "export.json"
    export_file.write_text("[]")
    with pytest.raises(DataError, match="no Label Studio key"):
        import_export(export_file, paths.root)
    tasks = json.loads(export_tasks(paths.root, {"helpfulness": "x"}, "single").tasks.read_text())
    assert len(tasks) == 8 and all("answer" in task["data"] for task in tasks)  # 4 rows x 2 models
    bad = [
        {
            "id": 1,
            "data": tasks[0]["data"],
            "annotations": [annotation(5, 1, [result("A_helpfulness", "answer", "rating", {"rating": 9})])],
        }
    ]
    export_file.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"task 1, annotation 5: A_helpfulness is 9"):
        import_export(export_file, paths.root)
    stranger = [{"id": 2, "data": {"item": "t99999"}, "annotations": []}]
    export_file.write_text(json.dumps(stranger))
    with pytest.raises(DataError, match="not one of the tasks exported"):
        import_export(export_file, paths.root)


def test_the_csv_sheet_flow_still_works(tmp_path: Path) -> None:
    paths = EvalPaths(tmp_path)
    write_sheet(paths, ["q1", "q2", "q3"], ["t1", "t2", "t3"], ["b1", "b2", "b3"], ("tuned", "base"), seed=1)
    key = json.loads(paths.pairwise_key.read_text())
    choices = {row: ("A" if sides["A"] == "tuned" else "B") for row, sides in key.items()}
    choices["p0002"] = "tie"
    sheet = tmp_path / "filled.csv"
    sheet.write_text("id,preference\n" + "".join(f"{row},{choice}\n" for row, choice in choices.items()))
    outcome = import_ratings(sheet, paths.pairwise_key)
    assert (outcome["wins"], outcome["ties"], outcome["losses"]) == (2, 1, 0)
    assert outcome["preference_rate"] == pytest.approx(2.5 / 3)
    assert not math.isnan(outcome["ci95"][0])


def test_labelstudio_commands(tmp_path: Path) -> None:
    paths = eval_folder(tmp_path / "evals" / "x", rows=3)
    runner = CliRunner()
    refused = runner.invoke(app, ["rate", "import-labelstudio", str(tmp_path / "none.json"), str(paths.root)])
    assert refused.exit_code == 2 and "no Label Studio key" in refused.output
    exported = runner.invoke(app, ["rate", "export-labelstudio", str(paths.root), "--mode", "single", "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["count"] == 6
    config = ElementTree.fromstring(paths.labelstudio_config.read_text())
    assert not list(config.iter("Choices")) and len(list(config.iter("Rating"))) == len(DEFAULT_RUBRIC)
    too_far = runner.invoke(app, ["rate", "export-labelstudio", str(paths.root), "--pair", "2"])
    assert too_far.exit_code == 2 and "--pair must be 1-1" in too_far.output
