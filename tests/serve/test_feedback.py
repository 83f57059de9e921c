"""Feedback: which ratings are accepted and which count as positive (through the real app on the tiny model), and
ratings surviving a restart through the JSON Lines file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tuneloop.config import RouteConfig, ServeConfig
from tuneloop.serve.gateway.app import create_app
from tuneloop.serve.gateway.feedback import FeedbackRequest, FeedbackStore
from tuneloop.serve.gateway.routing import Router
from tuneloop.stats import wilson_interval

ROUTE = "assistant"


def gateway_app(model_dir: Path, feedback_file: Path) -> FastAPI:
    from tuneloop.serve.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(ServeConfig(), str(model_dir), model_dir, {}, None)
    router = Router({ROUTE: RouteConfig(variants={str(model_dir): 1})})
    return create_app(engine, ServeConfig(), router=router, feedback_store=FeedbackStore(feedback_file))


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.jsonl"


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, feedback_file: Path) -> Iterator[TestClient]:
    with TestClient(gateway_app(tiny_model_dir, feedback_file)) as test_client:
        yield test_client


def served_response_id(client: TestClient) -> str:
    body = {"model": ROUTE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("rating", "stored", "positive"),
    [
        ("up", "up", True),
        (" Thumbs_Up ", "up", True),
        ("good", "up", True),
        ("positive", "up", True),
        ("down", "down", False),
        ("thumbs_down", "down", False),
        ("BAD", "down", False),
        ("negative", "down", False),
        (1, 1, False),  # the worst score, as the string "1" used to count as a thumbs up
        ("1", 1, False),
        (2, 2, False),
        (3, 3, False),  # top-two-box: the middle of the scale is not a preference
        ("3", 3, False),
        (4, 4, True),
        ("4", 4, True),
        (5, 5, True),
        (" 5 ", 5, True),
    ],
)
def test_accepted_ratings_and_what_counts_as_positive(
    client: TestClient, rating: Any, stored: str | int, positive: bool
) -> None:
    response = client.post("/v1/feedback", json={"response_id": served_response_id(client), "rating": rating})
    assert response.status_code == 200, response.text
    entry = response.json()
    assert (entry["rating"], entry["positive"]) == (stored, positive)
    assert entry["model"] == ROUTE


@pytest.mark.parametrize(
    "rating",
    [0, 6, -1, 100, 1.5, 4.0, "1.5", "0", "6", "+1", "-1", "maybe", "", True, False, None, [4], {"score": 4}],
)
def test_other_ratings_are_refused_naming_the_field(client: TestClient, rating: Any) -> None:
    response_id = served_response_id(client)
    response = client.post("/v1/feedback", json={"response_id": response_id, "rating": rating})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "rating" and error["type"] == "invalid_request_error"
    assert "`up`/`down`" in error["message"] and "1-5" in error["message"]


def test_missing_rating_and_malformed_bodies_are_4xx(client: TestClient) -> None:
    assert client.post("/v1/feedback", json={"response_id": "x"}).json()["error"]["param"] == "rating"
    for content in (b"", b"{not json", b"[]", b'"up"'):
        response = client.post("/v1/feedback", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json(), content


def test_unknown_response_id_is_404(client: TestClient) -> None:
    response = client.post("/v1/feedback", json={"response_id": "chatcmpl-never-served", "rating": "up"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "response_not_found"


def test_ratings_survive_a_restart_of_the_gateway(tiny_model_dir: Path, tmp_path: Path) -> None:
    feedback_file = tmp_path / "feedback.jsonl"
    with TestClient(gateway_app(tiny_model_dir, feedback_file)) as first:
        for rating in ("up", 5, "2", "down", 4):
            first.post("/v1/feedback", json={"response_id": served_response_id(first), "rating": rating})
        before = first.get("/v1/feedback/summary").json()["data"]
    with TestClient(gateway_app(tiny_model_dir, feedback_file)) as second:
        after = second.get("/v1/feedback/summary").json()["data"]
    assert [row["ratings"] for row in before] == [row["ratings"] for row in after] == [5]
    assert before[0]["preference_rate"] == after[0]["preference_rate"] == pytest.approx(3 / 5)
    assert (before[0]["responses"], after[0]["responses"]) == (5, 0)  # served counts restart, as documented


def rate(store: FeedbackStore, response_id: str, model: str, variant: str | None, rating: str | int) -> None:
    store.served_response(response_id, model, variant)
    assert store.record(FeedbackRequest(response_id=response_id, rating=rating)) is not None


def test_store_rebuilds_its_summary_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "serve" / "feedback.jsonl"
    store = FeedbackStore(path)
    rate(store, "r1", "extractor", "champion", "up")
    rate(store, "r2", "extractor", "champion", 2)
    rate(store, "r3", "extractor", "challenger", 5)
    rate(store, "r4", "base-model", None, "down")
    reopened = FeedbackStore(path)
    without_served = [{**row, "responses": 0} for row in store.summary()]
    assert reopened.summary() == without_served
    assert reopened.skipped_lines == 0
    assert reopened.record(FeedbackRequest(response_id="r1", rating="up")) is None  # ids are not kept across restarts


def test_store_skips_and_counts_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    good = {"model": "extractor", "variant": "champion", "positive": True}
    lines = [
        json.dumps(good),
        "not json",
        json.dumps({"model": "extractor", "variant": "champion"}),  # no `positive`
        json.dumps({**good, "positive": "yes"}),
        json.dumps([1, 2]),
        "",
        json.dumps({**good, "positive": False}),
        '{"model": "extractor", "vari',  # a crash in the middle of an append
    ]
    path.write_text("\n".join(lines))
    store = FeedbackStore(path)
    assert store.skipped_lines == 5
    assert store.summary() == [
        {
            "model": "extractor",
            "variant": "champion",
            "responses": 0,
            "ratings": 2,
            "positive": 1,
            "preference_rate": 0.5,
            "preference_ci95": pytest.approx(list(wilson_interval(0.5, 2))),
            "vs_control": None,  # the only variant is its route's control
        }
    ]
    rate(store, "r1", "extractor", "champion", "up")  # appended on a line of its own, after the cut one
    assert FeedbackStore(path).summary()[0]["ratings"] == 3
