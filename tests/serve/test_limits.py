"""Per-key rate limits and the synchronous batch endpoint, on the real in-process engine (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tuneloop.config import ServeConfig
from tuneloop.serve.engines.transformers_engine import TransformersEngine
from tuneloop.serve.gateway.app import create_app
from tuneloop.workspace import Workspace


def test_rate_limit_per_key_and_batch(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(ServeConfig(), str(tiny_model_dir), tiny_model_dir, {}, None)
    app = create_app(engine, ServeConfig(api_keys=["alpha", "beta"], rate_limit_per_minute=3))
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(app) as client:
        alpha = {"Authorization": "Bearer alpha"}
        statuses = [client.post("/v1/chat/completions", json=body, headers=alpha).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = client.post("/v1/chat/completions", json=body, headers=alpha)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["Retry-After"]) >= 1
        beta = {"Authorization": "Bearer beta"}  # another key has its own bucket
        batch = client.post(
            "/v1/batch",
            headers=beta,
            json={
                "requests": [
                    body,
                    {**body, "model": "missing"},
                    {**body, "messages": [{"role": "user", "content": "again"}]},
                ]
            },
        )
        assert batch.status_code == 200
        results = batch.json()["data"]
        assert [item["status"] for item in results] == [200, 404, 200]
        assert (
            results[0]["body"]["object"] == "chat.completion"
            and results[1]["body"]["error"]["code"] == "model_not_found"
        )


def test_completions_logprobs_and_echo_match_the_model(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = TransformersEngine(ServeConfig(), str(tiny_model_dir), tiny_model_dir, {}, None)
    app = create_app(engine, ServeConfig())
    prompt = "number 4 is 4"
    with TestClient(app) as client:
        scored = client.post(
            "/v1/completions",
            json={
                "model": str(tiny_model_dir),
                "prompt": prompt,
                "max_tokens": 0,
                "echo": True,
                "logprobs": 1,
                "temperature": 0,
            },
        ).json()
        generated = client.post(
            "/v1/completions",
            json={"model": str(tiny_model_dir), "prompt": prompt, "max_tokens": 3, "logprobs": 2, "temperature": 0},
        ).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [None] + [float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]
    choice = scored["choices"][0]
    assert choice["text"] == prompt and scored["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(choice["logprobs"]["token_logprobs"][1:], expected[1:], strict=True))
    assert "".join(choice["logprobs"]["tokens"]) == tokenizer.decode(ids)
    assert len(generated["choices"][0]["logprobs"]["tokens"]) == generated["usage"]["completion_tokens"] <= 3
    assert all(len(top) == 2 for top in generated["choices"][0]["logprobs"]["top_logprobs"])


def test_batch_jobs_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A job left `in_progress` by a crashed gateway is resumed by the next one without redoing finished lines."""
    import time

    from tuneloop.serve.gateway.batches import BatchStore

    store = BatchStore(Workspace(tmp_path).serve)
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lines = [{"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": body} for i in range(4)]
    upload = store.add_file("in.jsonl", "batch", "".join(json.dumps(line) + "\n" for line in lines).encode())
    job = store.create(upload["id"], "/v1/chat/completions", "24h", None)
    job["status"] = "in_progress"  # the crash: one line had finished, the rest had not
    store.save(job)
    finished = {"id": "x", "custom_id": "r0", "response": {"status_code": 200, "body": {}}, "error": None}
    (store.files / f"{job['output_file_id']}.data").write_text(json.dumps(finished) + "\n")
    app = create_app(
        TransformersEngine(ServeConfig(), str(tiny_model_dir), tiny_model_dir, {}, None),
        ServeConfig(),
        batch_store=BatchStore(Workspace(tmp_path).serve),
    )
    with TestClient(app) as client:
        deadline = time.time() + 60
        while client.get(f"/v1/batches/{job['id']}").json()["status"] != "completed" and time.time() < deadline:
            time.sleep(0.2)
        content = client.get(f"/v1/files/{job['output_file_id']}/content").text
    ids = [json.loads(line)["custom_id"] for line in content.splitlines()]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]  # r0 not redone, none lost


def test_n_choices(tiny_model_dir: Path) -> None:
    app = create_app(TransformersEngine(ServeConfig(), str(tiny_model_dir), tiny_model_dir, {}, None), ServeConfig())
    body = {
        "model": str(tiny_model_dir),
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "n": 3,
        "temperature": 0,
    }
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body).json()
        streamed = client.post(
            "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert [choice["index"] for choice in response["choices"]] == [0, 1, 2]
    assert len({choice["message"]["content"] for choice in response["choices"]}) == 1  # greedy: all equal
    assert 0 < response["usage"]["completion_tokens"] <= 9
    # Streamed n > 1: per choice the role first, its text, its finish_reason; one usage chunk for all choices.
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    texts, finished = {0: "", 1: "", 2: ""}, set()
    for event in events[:-1]:
        (choice,) = event["choices"]
        assert choice["index"] not in finished
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert [events[i]["choices"][0]["delta"]["role"] for i in range(3)] == ["assistant"] * 3
    assert finished == {0, 1, 2} and set(texts.values()) == {response["choices"][0]["message"]["content"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == response["usage"]


def test_default_max_tokens_fits_a_low_limit_and_zero_is_kept(tiny_model_dir: Path) -> None:
    """No max_tokens: the default (256) is capped at serve.max_tokens instead of refused; 0 is not "unset"."""
    settings = ServeConfig(max_tokens=16)
    app = create_app(TransformersEngine(settings, str(tiny_model_dir), tiny_model_dir, {}, None), settings)
    with TestClient(app) as client:
        chat = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 16
        scored = client.post(
            "/v1/completions",
            json={"model": str(tiny_model_dir), "prompt": "number 4", "max_tokens": 0, "echo": True, "logprobs": 0},
        )
        assert scored.status_code == 200, scored.text


def test_an_engine_failing_mid_stream_ends_the_stream_with_an_error_event(tiny_model_dir: Path) -> None:
    """After the headers went out, a failure can only be told in the stream (as vLLM does). The engine here is the
    real in-process engine made to fail after its first chunk: a failure cannot be provoked on demand otherwise."""

    class FailsMidStream(TransformersEngine):
        async def _stream(self, request: Any) -> Any:
            async for chunk in super()._stream(request):
                yield chunk
                raise RuntimeError("the engine lost its device")

    engine = FailsMidStream(ServeConfig(), str(tiny_model_dir), tiny_model_dir, {}, None)
    with TestClient(create_app(engine, ServeConfig())) as client:
        body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with client.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 8}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "lost its device" in error["message"] and error["type"] == "server_error"
