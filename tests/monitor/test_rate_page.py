"""/dashboard/rate end to end: a real gateway (`tuneloop serve`, tiny model) on 127.0.0.1, an evaluation folder in
its workspace, two raters clicking through a blind pairwise session in headless Chromium (Debian's, driven by
Playwright), then `tuneloop rate report`: the numbers match what was clicked and the pages never named a model.
Form validation (400 naming the field) and single mode are checked over plain HTTP on the same gateway."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.monitor.conftest import system_tool
from tests.serve.servers import start_serve, wait_ready
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.ratings import read_ratings
from tuneloop.artifacts.training import RunRecord
from tuneloop.cli import app
from tuneloop.config import DEFAULT_RUBRIC
from tuneloop.evaluate.human import krippendorff_alpha, t_interval
from tuneloop.stats import wilson_interval
from tuneloop.workspace import EvalPaths, Workspace

pytestmark = pytest.mark.slow

ROWS = 4
LABELS = ("tuned", "base")
RATERS = ("alice", "bob")
# Model output is untrusted: the page must show it as text, never run it.
HOSTILE = "<b>bold</b> <script>window.__xss = 1</script>"


def answer(label: str, row: int) -> str:
    """Answers that never contain a label's name, so a label on the page can only be a leak."""
    return f"Paris is the capital, row {row}. {HOSTILE}" if label == "tuned" else f"No idea, row {row}."


def label_of(text: str) -> str:
    return "tuned" if text.startswith("Paris") else "base"


def score(rater: str, label: str, dimension: str, row: int) -> int:
    """What each rater clicks for each answer."""
    if label == "tuned":
        return 5 if dimension == "helpfulness" and rater == "alice" else 4
    if dimension == "helpfulness":
        return 3 if rater == "bob" and row == 1 else 2
    return 3


def preference(rater: str, row: int) -> str:
    if rater == "alice":
        return "base" if row == 2 else "tuned"
    return "tie" if row == 1 else "tuned"


@dataclass
class RatedGateway:
    url: str
    workspace: Path
    folder: EvalPaths
    mlflow_run_id: str
    tracker: object


def write_eval_folder(root: Path, labels: tuple[str, ...], rows: int) -> EvalPaths:
    paths = EvalPaths(root)
    root.mkdir(parents=True)
    lines = [
        {
            "id": f"r{row:04d}",
            "prompt": f"What is the capital of France? ({row})",
            "messages": [{"role": "user", "content": f"What is the capital of France? ({row})"}],
            "reference": "Paris.",
            "outputs": {label: answer(label, row) for label in labels},
        }
        for row in range(rows)
    ]
    paths.outputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    EvalReport(
        models={label: label for label in labels},
        metrics={label: {"rouge_l": 0.1} for label in labels},
        passed=True,
        rows=rows,
        data="val",
        report=str(paths.report_html),
        dir=str(root),
    ).save(paths.metrics)
    paths.report_md.write_text("# Evaluation report\n")
    return paths


@pytest.fixture(scope="module")
def rated_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RatedGateway]:
    root = tmp_path_factory.mktemp("rate-page")
    workspace = Workspace(root / "ws")
    from tuneloop.tracking import Tracker

    tracker = Tracker.open(workspace, None, "rating")
    mlflow_run_id = tracker.start_run("run-1", {}, {})
    run = workspace.run("run-1")
    workspace.ensure(run.root)
    RunRecord(
        run_id="run-1", key="k", status="finished", dataset_id="d", created_at="now", mlflow_run_id=mlflow_run_id
    ).save(run.record)
    folder = write_eval_folder(run.evals / "20261126-000000-tuned-vs-base", LABELS, ROWS)
    write_eval_folder(workspace.evals / "20261126-000001-base", ("base",), 2)
    damaged = workspace.ensure(workspace.evals / "20261126-000002-damaged")
    EvalPaths(damaged).outputs.write_text("{not json\n")
    config = {
        "project": {"name": "rating"},
        "model": {"base": str(tiny_model_dir)},
        "serve": {"engine": "transformers", "precision": "fp32"},
    }
    config_path = root / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process, url = start_serve(config_path, workspace.root)
    try:
        wait_ready(url, process)
        yield RatedGateway(url, workspace.root, folder, mlflow_run_id, tracker)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_two_raters_click_through_a_blind_session_and_the_report_matches(rated_gateway: RatedGateway) -> None:
    from playwright.sync_api import sync_playwright

    seen: dict[str, list[tuple[str, str]]] = {}  # rater -> (row id, which side showed tuned) in the order shown
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=system_tool("chromium"), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            for rater in RATERS:
                seen[rater] = rate_everything(browser.new_page(), rated_gateway.url, rater)
        finally:
            browser.close()

    for rater in RATERS:
        assert sorted(row for row, _ in seen[rater]) == [f"r{row:04d}" for row in range(ROWS)]
    assert [row for row, _ in seen["alice"]] != [row for row, _ in seen["bob"]], "each rater gets their own order"
    sides = {side for rater in RATERS for _, side in seen[rater]}
    assert sides == {"A", "B"}, "which model is A is shuffled"

    stored = read_ratings(rated_gateway.folder.ratings)
    assert len(stored) == ROWS * len(RATERS)
    note = next(r for r in stored if r.note)
    assert note.rater == "alice" and note.note == "first one <checked>"

    result = CliRunner().invoke(app, ["rate", "report", str(rated_gateway.folder.root), "--json"])
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    tuned, base = outcome["metrics"]["tuned"], outcome["metrics"]["base"]
    dimensions = list(DEFAULT_RUBRIC)
    for label, metrics in (("tuned", tuned), ("base", base)):
        for dimension in dimensions:
            row_means = [sum(score(r, label, dimension, row) for r in RATERS) / 2 for row in range(ROWS)]
            assert metrics[f"human_{dimension}_mean"] == pytest.approx(sum(row_means) / ROWS), (label, dimension)
    assert base["human_helpfulness_mean"] == pytest.approx(2.125)
    _, low, high = t_interval([2.0, 2.5, 2.0, 2.0])
    assert (base["human_helpfulness_ci_low"], base["human_helpfulness_ci_high"]) == pytest.approx((low, high))
    # tuned: alice 3 wins 1 loss, bob 3 wins 1 tie -> 6.5 of 8
    assert tuned["human_win_rate"] == pytest.approx(6.5 / 8)
    assert (tuned["human_win_rate_ci_low"], tuned["human_win_rate_ci_high"]) == pytest.approx(
        wilson_interval(6.5 / 8, 8)
    )
    score_units = {
        (row, label, dimension): {rater: score(rater, label, dimension, row) for rater in RATERS}
        for row in range(ROWS)
        for label in LABELS
        for dimension in dimensions
    }
    preference_units = {row: {rater: preference(rater, row) for rater in RATERS} for row in range(ROWS)}
    assert tuned["human_agreement_alpha"] == pytest.approx(krippendorff_alpha(score_units, "ordinal"))
    assert tuned["human_preference_alpha"] == pytest.approx(krippendorff_alpha(preference_units, "nominal"))
    assert tuned["human_raters"] == 2 and tuned["human_rated_rows"] == ROWS

    saved = EvalReport.load(rated_gateway.folder.metrics).metrics
    assert saved["tuned"]["human_win_rate"] == pytest.approx(6.5 / 8) and saved["tuned"]["rouge_l"] == 0.1
    assert "## Human evaluation" in rated_gateway.folder.report_md.read_text()
    logged = rated_gateway.tracker.client.get_run(rated_gateway.mlflow_run_id).data.metrics  # type: ignore[attr-defined]
    assert logged["eval.tuned.human_win_rate"] == pytest.approx(6.5 / 8)


def rate_everything(page: object, url: str, rater: str) -> list[tuple[str, str]]:
    """Start a pairwise session on the index page, then rate every item as the policy above says."""
    page.goto(f"{url}/dashboard/rate")  # type: ignore[attr-defined]
    session_form = page.locator("tr", has_text="tuned-vs-base").locator("form")  # type: ignore[attr-defined]
    session_form.locator('input[name="rater"]').fill(rater)
    session_form.locator('select[name="mode"]').select_option("pairwise")
    session_form.locator("button").click()
    page.wait_for_load_state()  # type: ignore[attr-defined]
    shown = []
    for done in range(ROWS):
        html = page.content()  # type: ignore[attr-defined]
        assert not re.search(r"tuned|base", html, re.IGNORECASE), "a model label is on the rating page"
        assert page.inner_text("#progress") == f"{done} of {ROWS} rated"  # type: ignore[attr-defined]
        row_id = page.input_value('input[name="row_id"]')  # type: ignore[attr-defined]
        row = int(row_id[1:])
        labels = {side: label_of(page.inner_text(f"#answer-{side} pre")) for side in "AB"}  # type: ignore[attr-defined]
        assert sorted(labels.values()) == sorted(LABELS)
        tuned_text = page.inner_text(f"#answer-{'A' if labels['A'] == 'tuned' else 'B'} pre")  # type: ignore[attr-defined]
        assert HOSTILE in tuned_text, "model output is shown as text"
        assert page.evaluate("() => window.__xss === undefined"), "model output ran as script"  # type: ignore[attr-defined]
        for side, label in labels.items():
            for dimension in DEFAULT_RUBRIC:
                value = score(rater, label, dimension, row)
                page.check(f'input[name="{side}.{dimension}"][value="{value}"]')  # type: ignore[attr-defined]
        wanted = preference(rater, row)
        choice = "tie" if wanted == "tie" else next(side for side, label in labels.items() if label == wanted)
        page.check(f'input[name="preference"][value="{choice}"]')  # type: ignore[attr-defined]
        if rater == "alice" and done == 0:
            page.fill('textarea[name="note"]', "first one <checked>")  # type: ignore[attr-defined]
        page.click('button[type="submit"]')  # type: ignore[attr-defined]
        page.wait_for_load_state()  # type: ignore[attr-defined]
        shown.append((row_id, "A" if labels["A"] == "tuned" else "B"))
    assert page.inner_text("#progress") == f"{ROWS} of {ROWS} rated"  # type: ignore[attr-defined]
    assert page.locator("#done").count() == 1  # type: ignore[attr-defined]
    page.reload()  # rated items are skipped: still done  # type: ignore[attr-defined]
    assert page.locator("#done").count() == 1  # type: ignore[attr-defined]
    return shown


def session_page(url: str, folder_id: str, rater: str, mode: str) -> httpx.Response:
    params = {"folder": folder_id, "rater": rater, "mode": mode}
    return httpx.get(f"{url}/dashboard/rate/session", params=params, timeout=30)


def test_single_mode_and_form_validation(rated_gateway: RatedGateway) -> None:
    url = rated_gateway.url
    index = httpx.get(f"{url}/dashboard/rate", timeout=30)
    assert index.status_code == 200 and "20261126-000001-base" in index.text
    folder_ids = re.findall(r'name="folder" value="([0-9a-f]{16})"', index.text)
    assert len(folder_ids) == 2  # the damaged folder is listed with its error, without a form
    assert re.search(r"20261126-000002-damaged</td><td[^>]*>cannot be rated: .*outputs.jsonl:1", index.text)
    single_id = next(f for f in folder_ids if "Grade" in session_page(url, f, "carol", "single").text)
    page = session_page(url, single_id, "carol", "single")
    assert "0 of 2 rated" in page.text and "Answer B" not in page.text
    position = re.search(r'name="position" value="(\d+)"', page.text).group(1)  # type: ignore[union-attr]
    row_id = re.search(r'name="row_id" value="(r\d+)"', page.text).group(1)  # type: ignore[union-attr]
    form = {"folder": single_id, "rater": "carol", "mode": "single", "pair": "1", "position": position}
    form |= {"row_id": row_id} | {f"A.{dimension}": "4" for dimension in DEFAULT_RUBRIC}

    def post(changes: dict[str, str]) -> httpx.Response:
        body = {name: value for name, value in (form | changes).items() if value is not None}
        return httpx.post(f"{url}/dashboard/rate/session", data=body, timeout=30)

    for changes, field in (
        ({"A.safety": "7"}, "A.safety"),
        ({"A.helpfulness": ""}, "A.helpfulness"),
        ({"rater": "a b/c"}, "rater"),
        ({"mode": "triple"}, "mode"),
        ({"position": "99"}, "position"),
    ):
        refused = post(changes)
        assert refused.status_code == 400, (changes, refused.text)
        assert refused.json()["error"]["param"] == field
    assert post({"folder": "0" * 16}).status_code == 404
    as_json = httpx.post(f"{url}/dashboard/rate/session", json=form, timeout=30)  # not a form: nothing in it
    assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "folder"
    assert session_page(url, single_id, "carol", "pairwise").status_code == 400  # one model: nothing to compare

    stored = post({})
    assert stored.status_code == 303 and "1 of 2 rated" in httpx.get(url + stored.headers["location"]).text
    single_folder = EvalPaths(rated_gateway.workspace / "evals" / "20261126-000001-base")
    (rating,) = read_ratings(single_folder.ratings)
    assert rating.answers == {"A": "base"} and rating.scores == {"base": dict.fromkeys(DEFAULT_RUBRIC, 4)}
    assert rating.row_id == row_id and rating.preference is None
