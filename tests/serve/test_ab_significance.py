"""Online A/B significance through a real gateway (`tuneloop serve` on 127.0.0.1, the tiny model and a random LoRA
adapter as the two variants of two routes): ratings posted per variant, then /dashboard/data.json, /dashboard and
`tuneloop ab report` (from the URL and from the feedback file) must show the intervals, p-values and verdicts the
numbers call for: a clear winner on one route, no significant difference on the other."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from tests.serve.servers import start_serve, wait_ready
from tests.test_stats import fisher_two_sided_by_hand
from tests.tiny_model import save_random_lora
from tuneloop.cli import app
from tuneloop.serve.gateway.feedback import FeedbackRequest, FeedbackStore, format_p
from tuneloop.stats import ratings_needed, wilson_interval

PER_VARIANT = 30
# Positive ratings out of PER_VARIANT per route: (control, challenger).
POSITIVE = {"clear": (6, 27), "even": (15, 15)}


@dataclass
class AbGateway:
    url: str
    config: Path
    workspace: Path
    control: str
    challenger: str


@pytest.fixture(scope="module")
def ab_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[AbGateway]:
    root = tmp_path_factory.mktemp("ab-significance")
    adapter = save_random_lora(tiny_model_dir, root / "challenger")
    control, challenger = str(tiny_model_dir), str(adapter)
    variants = {control: 50, challenger: 50}
    config = {
        "project": {"name": "ab"},
        "model": {"base": control},
        "serve": {
            "engine": "transformers",
            "precision": "fp32",
            "routes": {route: {"variants": variants, "sticky": False} for route in POSITIVE},
        },
    }
    config_path = root / "ab.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))  # the first variant is the control
    workspace = root / "ws"
    process, url = start_serve(config_path, workspace)
    try:
        wait_ready(url, process)
        for route, positives in POSITIVE.items():
            rate_until_full(url, route, dict(zip((control, challenger), positives, strict=True)))
        yield AbGateway(url, config_path, workspace, control, challenger)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def rate_until_full(url: str, route: str, positives: dict[str, int]) -> None:
    """Ask the route until each variant has answered PER_VARIANT times; rate each answer, the first `positives`
    of a variant up and the rest down."""
    rated = dict.fromkeys(positives, 0)
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(20 * PER_VARIANT):
            if min(rated.values()) >= PER_VARIANT:
                return
            body = {"model": route, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            variant = answer.json()["model"]
            if rated[variant] >= PER_VARIANT:
                continue
            rating = "up" if rated[variant] < positives[variant] else "down"
            feedback = client.post("/v1/feedback", json={"response_id": answer.json()["id"], "rating": rating})
            assert feedback.status_code == 200, feedback.text
            rated[variant] += 1
    pytest.fail(f"route {route} did not reach {PER_VARIANT} answers per variant: {rated}")


def by_route(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["route"], row["variant"]): row for row in rows}


def check_rows(rows: list[dict[str, Any]], gateway: AbGateway) -> None:
    """The numbers every view must show, computed here from the ratings posted."""
    table = by_route(rows)
    for route, (control_positive, challenger_positive) in POSITIVE.items():
        control, challenger = table[(route, gateway.control)], table[(route, gateway.challenger)]
        assert control["control"] and control["vs_control"] is None
        for row, positive in ((control, control_positive), (challenger, challenger_positive)):
            assert (row["ratings"], row["positive"]) == (PER_VARIANT, positive)
            assert row["preference_rate"] == pytest.approx(positive / PER_VARIANT)
            assert row["preference_ci95"] == pytest.approx(list(wilson_interval(positive / PER_VARIANT, PER_VARIANT)))
        versus = challenger["vs_control"]
        assert versus["control"] == gateway.control
        assert versus["difference"] == pytest.approx((challenger_positive - control_positive) / PER_VARIANT)
        expected_p = fisher_two_sided_by_hand(challenger_positive, PER_VARIANT, control_positive, PER_VARIANT)
        assert versus["p_value"] == pytest.approx(expected_p, rel=1e-6)
        low, high = versus["ci95"]
        assert low <= versus["difference"] <= high
    clear, even = table[("clear", gateway.challenger)]["vs_control"], table[("even", gateway.challenger)]["vs_control"]
    # 27/30 against 6/30: p ~ 1e-7, far below 0.05, and the interval is well clear of 0.
    assert clear["significant"] and clear["p_value"] < 1e-5 and clear["ci95"][0] > 0.4
    assert clear["verdict"] == f"{gateway.challenger} better (p<0.001)"
    # 15/30 against 15/30: nothing to see, and 30 ratings are far from what a 10-point difference needs.
    assert not even["significant"] and even["p_value"] == pytest.approx(1.0) and even["ci95"][0] < 0 < even["ci95"][1]
    more = ratings_needed(0.5) - PER_VARIANT
    assert even["verdict"] == (
        f"no significant difference yet (p=1.000); ~{more} more ratings per variant needed for a 10-point difference"
    )


def test_dashboard_data_and_page_show_intervals_and_verdicts(ab_gateway: AbGateway) -> None:
    data = httpx.get(f"{ab_gateway.url}/dashboard/data.json", timeout=30).json()
    check_rows(data["variants"], ab_gateway)
    page = httpx.get(f"{ab_gateway.url}/dashboard", timeout=30).text
    assert "95% CI of difference" in page and "Fisher" in page
    assert "better (p&lt;0.001)" in page and "no significant difference yet (p=1.000)" in page
    # 27/30 on "clear": its Wilson interval, and +0.70 over the control's 6/30.
    assert "<td>0.90</td>" in page and "0.74 – 0.97" in page and "<td>+0.70</td>" in page


def test_ab_report_from_the_gateway_url(ab_gateway: AbGateway) -> None:
    result = CliRunner().invoke(app, ["ab", "report", "--url", ab_gateway.url, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"] == ab_gateway.url
    check_rows(report["variants"], ab_gateway)
    text = CliRunner().invoke(app, ["ab", "report", "--url", ab_gateway.url], env={"COLUMNS": "400"})
    assert text.exit_code == 0, text.output
    assert "better (p<0.001)" in text.stdout and "no significant difference yet" in text.stdout
    assert "90.0% [74.4%, 96.5%]" in text.stdout  # 27/30 with its Wilson interval
    assert "+70.0 pts" in text.stdout


def test_ab_report_from_the_feedback_file(ab_gateway: AbGateway) -> None:
    feedback = ab_gateway.workspace / "serve" / "feedback.jsonl"
    arguments = ["ab", "report", "--feedback", str(feedback), "-c", str(ab_gateway.config), "--json"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["variants"]
    check_rows(rows, ab_gateway)
    assert all(row["responses"] is None for row in rows)  # served counts live only in the running gateway


def test_ab_report_errors_are_clear(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["ab", "report", "--feedback", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "no feedback file at" in missing.output
    both = CliRunner().invoke(app, ["ab", "report", "--url", "http://127.0.0.1:9", "--feedback", "x"])
    assert both.exit_code == 2 and "not both" in both.output
    down = CliRunner().invoke(app, ["ab", "report", "--url", "http://127.0.0.1:9", "--json"])
    assert down.exit_code == 2 and "could not read the A/B variants" in json.loads(down.stdout)["error"]


def rated_store(counts: dict[str, tuple[int, int]]) -> FeedbackStore:
    """A store with, per variant of route "r", (positive, total) ratings, the variants first seen in `counts` order."""
    store = FeedbackStore(None)
    for variant, (positive, total) in counts.items():
        for i in range(total):
            store.served_response(f"{variant}-{i}", "r", variant)
            rating = "up" if i < positive else "down"
            assert store.record(FeedbackRequest(response_id=f"{variant}-{i}", rating=rating)) is not None
    return store


def test_verdicts_for_every_case() -> None:
    by_variant = {row["variant"]: row for row in rated_store({"a": (200, 400), "b": (210, 400)}).summary()}
    assert by_variant["a"]["vs_control"] is None  # no controls given: the variant seen first
    versus = by_variant["b"]["vs_control"]
    assert versus["control"] == "a" and not versus["significant"] and versus["ratings_needed_per_variant"] == 388
    assert versus["verdict"] == (
        f"no significant difference ({format_p(versus['p_value'])}); enough ratings to see a 10-point difference, so "
        "any real one is smaller"
    )
    store = rated_store({"a": (40, 50), "b": (10, 50)})
    worse = {row["variant"]: row for row in store.summary({"r": "a"})}["b"]["vs_control"]
    assert worse["difference"] == pytest.approx(-0.6) and worse["verdict"] == "a better (p<0.001)"
    swapped = {row["variant"]: row for row in store.summary({"r": "b"})}["a"]["vs_control"]
    assert swapped["control"] == "b" and swapped["difference"] == pytest.approx(0.6)
    lonely = {row["variant"]: row for row in rated_store({"b": (3, 4)}).summary({"r": "a"})}["b"]["vs_control"]
    assert lonely["verdict"] == "no ratings yet for a" and lonely["p_value"] is None
