"""A real gateway process on 127.0.0.1 (tiny model + a trained adapter), driven with the official openai client."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.serve.servers import start_serve, wait_ready
from tuneloop.cli import app

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("serve")
    workspace = root / "ws"
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": f"Repeat {i}", "output": f"number {i}"}) + "\n" for i in range(40))
    )
    config = root / "config.yaml"
    config.write_text(
        f"model: {{base: {tiny_model_dir}}}\n"
        f"data: {{sources: [{{path: {rows}}}], max_seq_len: 128,"
        " filters: {near_duplicates: {enabled: false}, toxicity: {enabled: false}}}\n"
        "train: {max_steps: 4, batch_size: 2, eval_every: 2, save_every: 2, report_to: []}\n"
        f"serve: {{engine: transformers, api_keys: [{API_KEY}], precision: fp32}}\n"
    )
    routes = root / "routes.yaml"  # written once the adapters exist: an A/B split between them
    os.environ["TUNELOOP_HOME"] = str(workspace)
    run_ids = []
    try:
        for seed in (1, 2):  # two different adapters on the same base
            result = CliRunner().invoke(
                app,
                [
                    "train",
                    "-c",
                    str(config),
                    "--json",
                    "--set",
                    f"train.seed={seed}",
                    "--set",
                    f"train.learning_rate={0.01 * seed}",
                ],
            )
            assert result.exit_code == 0, result.output
            run_ids.append(json.loads(result.stdout)["run_id"])
    finally:
        del os.environ["TUNELOOP_HOME"]
    run_id, second = run_ids
    routes.write_text(
        config.read_text().replace(
            "precision: fp32}",
            f"precision: fp32, routes: {{extractor: {{variants: {{{run_id}: 90, {second}: 10}}}}}}}}",
        )
    )
    process, url = start_serve(routes, workspace)
    wait_ready(url, process)
    yield {"url": url, "base": str(tiny_model_dir), "adapter": run_id, "adapter2": second, "process": process}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0  # drains and exits 0


@pytest.fixture
def client(gateway: dict):
    from openai import OpenAI

    return OpenAI(base_url=f"{gateway['url']}/v1", api_key=API_KEY, max_retries=0)


def test_models_list_has_base_and_adapter_with_parent(client, gateway: dict) -> None:
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {gateway["base"], gateway["adapter"], gateway["adapter2"], "extractor"}
    assert models[gateway["adapter"]].model_extra["parent"] == gateway["base"]


def test_chat_completion_with_usage(client, gateway: dict) -> None:
    response = client.chat.completions.create(
        model=gateway["adapter"], messages=[{"role": "user", "content": "Repeat 3"}], max_tokens=6, temperature=0
    )
    assert response.object == "chat.completion" and response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 6
    again = client.chat.completions.create(
        model=gateway["adapter"], messages=[{"role": "user", "content": "Repeat 3"}], max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == response.choices[0].message.content  # greedy is deterministic


def test_streaming_like_openai(client, gateway: dict) -> None:
    stream = client.chat.completions.create(
        model=gateway["base"],
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    finished = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    plain = client.chat.completions.create(
        model=gateway["base"], messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    assert text == plain.choices[0].message.content


def test_completions_endpoint(client, gateway: dict) -> None:
    response = client.completions.create(
        model=gateway["base"], prompt="number 4 is", max_tokens=4, temperature=0, echo=True
    )
    assert response.choices[0].text.startswith("number 4 is") and response.usage.completion_tokens == 4


def test_bad_inputs_get_openai_style_4xx(gateway: dict) -> None:
    from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

    url = f"{gateway['url']}/v1"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(BadRequestError):
        client.chat.completions.create(
            model=gateway["base"], messages=[{"role": "user", "content": "x"}], max_tokens=-1
        )
    with pytest.raises(BadRequestError) as huge:
        client.chat.completions.create(model=gateway["base"], messages=[{"role": "user", "content": "x " * 40000}])
    assert huge.value.body["code"] == "context_length_exceeded"
    malformed = httpx.post(
        f"{url}/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert malformed.status_code == 400 and "error" in malformed.json()
    too_big = httpx.post(
        f"{url}/chat/completions",
        content=b"x" * 1_100_000,
        timeout=10,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert too_big.status_code == 413


def test_metrics_endpoint(client, gateway: dict) -> None:
    client.chat.completions.create(model=gateway["base"], messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{gateway['url']}/metrics", timeout=10).text
    for name in (
        "tuneloop:time_to_first_token_seconds_bucket",
        "tuneloop:e2e_request_latency_seconds_count",
        "tuneloop:generation_tokens_total",
        "tuneloop:requests_total",
        "tuneloop:num_requests_running",
    ):
        assert name in text, name


def test_mixed_adapter_batch_equals_each_alone(client, gateway: dict) -> None:
    """Concurrent requests for two adapters and the base share one batch; each answer equals its model run alone."""
    from concurrent.futures import ThreadPoolExecutor

    names = [gateway["adapter"], gateway["adapter2"], gateway["base"]] * 2
    prompts = [f"Repeat {i}" for i in range(len(names))]

    def ask(pair: tuple[str, str]) -> str:
        response = client.chat.completions.create(
            model=pair[0], messages=[{"role": "user", "content": pair[1]}], max_tokens=8, temperature=0
        )
        return response.choices[0].message.content

    alone = [ask(pair) for pair in zip(names, prompts, strict=True)]
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(ask, zip(names, prompts, strict=True)))
    assert together == alone
    assert httpx.get(f"{gateway['url']}/health", timeout=10).json()["largest_batch"] > 1  # they did share a batch
    assert len({alone[0], alone[1], alone[2]}) > 1  # the adapters really differ
    metrics = httpx.get(f"{gateway['url']}/metrics", timeout=10).text
    assert (
        f'tuneloop:requests_total{{model="{gateway["adapter2"]}",status="success",variant="{gateway["adapter2"]}"}}'
        in metrics
    )


def test_ab_split_proportions_stickiness_and_feedback(gateway: dict) -> None:
    url = f"{gateway['url']}/v1"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "extractor", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    chosen: dict[str, str] = {}
    ids: dict[str, list[str]] = {gateway["adapter"]: [], gateway["adapter2"]: []}
    with httpx.Client(timeout=30, headers=headers) as http:
        for index in range(200):
            response = http.post(f"{url}/chat/completions", json={**body, "user": f"user-{index}"})
            assert response.status_code == 200
            variant = response.headers["x-tuneloop-variant"]
            chosen[f"user-{index}"] = variant
            ids[variant].append(response.json()["id"])
        share = len(ids[gateway["adapter2"]]) / 200
        assert 0.04 <= share <= 0.18  # 10% challenger, binomial spread at n=200
        for user in ("user-3", "user-77"):  # sticky per user
            again = http.post(f"{url}/chat/completions", json={**body, "user": user})
            assert again.headers["x-tuneloop-variant"] == chosen[user]
        for response_id in ids[gateway["adapter"]][:4]:
            assert http.post(f"{url}/feedback", json={"response_id": response_id, "rating": "up"}).status_code == 200
        for response_id in ids[gateway["adapter2"]][:2]:
            assert http.post(f"{url}/feedback", json={"response_id": response_id, "rating": 2}).status_code == 200
        missing = http.post(f"{url}/feedback", json={"response_id": "nope", "rating": "up"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"
        summary = {row["variant"]: row for row in http.get(f"{url}/feedback/summary").json()["data"]}
    assert summary[gateway["adapter"]]["preference_rate"] == 1.0 and summary[gateway["adapter"]]["ratings"] == 4
    assert summary[gateway["adapter2"]]["preference_rate"] == 0.0
    assert summary[gateway["adapter"]]["responses"] >= 160


def test_bench_serve_reports_latency_percentiles(gateway: dict) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "serve",
            "--url",
            gateway["url"],
            "--model",
            gateway["adapter"],
            "--users",
            "4",
            "--requests",
            "12",
            "--max-tokens",
            "6",
            "--api-key",
            API_KEY,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in (
        "ttft_p50_s",
        "ttft_p95_s",
        "ttft_p99_s",
        "e2e_p50_s",
        "output_tokens_per_second",
        "requests_per_second",
        "errors",
    ):
        assert key in report, key
    assert report["errors"] == 0 and report["requests"] == 12
    assert 0 < report["ttft_p50_s"] <= report["ttft_p99_s"] and report["output_tokens_per_second"] > 0
    unauthorised = CliRunner().invoke(
        app,
        [
            "bench",
            "serve",
            "--url",
            gateway["url"],
            "--model",
            gateway["adapter"],
            "--users",
            "2",
            "--requests",
            "2",
            "--json",
        ],
    )
    assert json.loads(unauthorised.stdout)["errors"] == 2


def test_files_and_batches_round_trip(client, gateway: dict, tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": gateway["adapter"],
                "messages": [{"role": "user", "content": f"Repeat {i}"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        }
        for i in range(5)
    ]
    lines.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        }
    )
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 5, 1)
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == [f"req-{i}" for i in range(5)]
    assert all(item["response"]["status_code"] == 200 for item in output)
    assert output[0]["response"]["body"]["object"] == "chat.completion"
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad" and errors[0]["response"]["status_code"] == 404
    assert any(item.id == batch.id for item in client.batches.list().data)
