"""A real gateway fuzzed from its own /openapi.json with schemathesis: whatever the body, query or path of any
operation, the answer is never a 5xx. Bodies are valid and invalid (schemathesis' positive and negative modes), so a
malformed body must be refused with a 4xx, not crash a route. Valid completion requests name the served model and ask
for few tokens, so that they reach the engine. Then, deterministically: malformed bodies on every POST, batch
creation's validation, and the inputs the fuzzer found crashing the engine.

The gateway is a `tuneloop serve` process on the tiny test model; `serve.max_tokens` is kept small so generations
finish quickly on a CPU. Operations are driven with hypothesis directly: schemathesis' pytest loader
(`schemathesis.pytest.from_fixture`) sets `Node._nodeid`, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation

from tests.serve.servers import server_output, start_serve, wait_ready

EXAMPLES_PER_OPERATION = 30
SECONDS_PER_REQUEST = 60
MAX_TOKENS = 16  # serve.max_tokens of the fuzzed gateway


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    url: str
    model: str  # the one model it serves


def reaching_the_model(case: schemathesis.Case, model: str) -> schemathesis.Case:
    """A valid completion request for the served model asking for at most MAX_TOKENS, so that it reaches the engine:
    a generated model name is unknown (a 404 before any generation), and the gateway refuses a max_tokens above
    serve.max_tokens, or a missing one (the default, 256, is above it)."""
    bodies = case.body.get("requests") if case.path == "/v1/batch" and isinstance(case.body, dict) else [case.body]
    for body in bodies if isinstance(bodies, list) else []:
        if isinstance(body, dict) and ("messages" in body or "prompt" in body):
            body["model"] = model
            asked = body.get("max_tokens")
            body["max_tokens"] = asked if isinstance(asked, int) and asked <= MAX_TOKENS else MAX_TOKENS
            body.pop("max_completion_tokens", None)
    return case


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("fuzz")
    config = root / "config.yaml"
    config.write_text(
        f"model: {{base: {tiny_model_dir}}}\nserve: {{engine: transformers, precision: fp32, max_tokens: {MAX_TOKENS}}}\n"
    )
    process, url = start_serve(config, root / "ws")
    wait_ready(url, process)
    yield Gateway(process, url, str(tiny_model_dir))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, server_output(process)


@pytest.fixture(scope="module")
def gateway_schema(gateway: Gateway) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=30)
    schema.config.output.sanitization.update(enabled=False)  # it masks `max_tokens` in reports as if it were a secret
    return schema


def fuzz(operation: APIOperation, mode: GenerationMode, gateway: Gateway) -> None:
    """EXAMPLES_PER_OPERATION requests to one operation; fails on the first 5xx, with a curl line to reproduce it."""
    cases = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        cases = cases.map(lambda case: reaching_the_model(case, gateway.model))

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,  # a generation on a busy 2-core machine may take seconds
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        database=None,  # no example database: each run explores afresh, nothing replayed from disk
    )
    @given(case=cases)
    def call(case: schemathesis.Case) -> None:
        response = case.call(timeout=SECONDS_PER_REQUEST)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup as failure:  # add the gateway's traceback to schemathesis' report
            pytest.fail(f"{failure}\n--- gateway output ---\n{server_output(gateway.process)}", pytrace=False)

    try:
        call()
    except Unsatisfiable:
        # Negative mode on an operation nothing can be wrong with (no parameters, or only free-form strings).
        if mode is not GenerationMode.NEGATIVE:
            raise


@pytest.mark.slow
def test_no_operation_answers_a_server_error(
    gateway: Gateway, gateway_schema: schemathesis.BaseSchema, subtests: pytest.Subtests
) -> None:
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    assert len(operations) >= 15  # the whole API was loaded, not an empty or partial schema
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with subtests.test(operation=operation.label, mode=mode.value):
                fuzz(operation, mode, gateway)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b"null", b'"text"'], ids=repr)
def test_malformed_body_on_every_post_is_an_openai_4xx(
    gateway: Gateway, gateway_schema: schemathesis.BaseSchema, content: bytes
) -> None:
    posts = [result.ok().path for result in gateway_schema.get_all_operations() if result.ok().method == "post"]
    assert "/v1/batches" in posts and "/v1/feedback" in posts
    for path in posts:
        response = httpx.post(
            f"{gateway.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30
        )
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], (path, error)


def test_batch_creation_is_validated(gateway: Gateway) -> None:
    with httpx.Client(base_url=f"{gateway.url}/v1", timeout=30) as client:
        request = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "x"}}
        batch_file = client.post(
            "/files", files={"file": ("in.jsonl", json.dumps(request) + "\n")}, data={"purpose": "batch"}
        ).json()["id"]
        other_file = client.post(
            "/files", files={"file": ("notes.txt", b"\xff\xfe not a batch")}, data={"purpose": "fine-tune"}
        ).json()["id"]
        refusals = {
            "endpoint": {"input_file_id": batch_file, "endpoint": "/v1/embeddings"},
            "input_file_id": {"input_file_id": "file-none", "endpoint": "/v1/completions"},
            "completion_window": {
                "input_file_id": batch_file,
                "endpoint": "/v1/completions",
                "completion_window": "1h",
            },
        }
        for param, body in refusals.items():
            response = client.post("/batches", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        not_for_batches = client.post("/batches", json={"input_file_id": other_file, "endpoint": "/v1/completions"})
        assert not_for_batches.status_code == 400 and "purpose" in not_for_batches.json()["error"]["message"]
        for identifier in ("../../etc/passwd", "x" * 300, "file-" + "%00"):
            assert client.get(f"/files/{identifier}").status_code == 404
            assert client.get(f"/batches/{identifier}").status_code == 404


def test_batch_with_a_malformed_request_fails_instead_of_hanging(gateway: Gateway) -> None:
    with httpx.Client(base_url=f"{gateway.url}/v1", timeout=30) as client:
        lines = [{"custom_id": "ok", "body": {"model": gateway.model}}, {"custom_id": "list", "body": [1, 2]}]
        content = "".join(json.dumps(line) + "\n" for line in lines)
        input_file = client.post("/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()
        batch = client.post("/batches", json={"input_file_id": input_file["id"], "endpoint": "/v1/chat/completions"})
        deadline = time.monotonic() + 30
        job = batch.json()
        while job["status"] in ("validating", "in_progress") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"/batches/{job['id']}").json()
    assert job["status"] == "failed" and job["errors"]["data"][0]["line"] == 2, job


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [""]}, "prompt"),
        ("/v1/completions", {"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
        ("/v1/chat/completions", {"seed": 2**64}, "seed"),
        ("/v1/chat/completions", {"seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {"temperature": 5e-324}, None),
        ("/v1/chat/completions", {"temperature": 5e-324, "stream": True, "n": 2}, None),
    ],
    ids=[
        "empty-prompt",
        "empty-prompt-in-list",
        "empty-prompt-scored",
        "seed-2**64",
        "seed-below-int64",
        "tiny-temperature",
        "tiny-temperature-streamed",
    ],
)
def test_inputs_found_crashing_the_engine(gateway: Gateway, path: str, fields: dict, param: str | None) -> None:
    """Inputs the fuzzer found answered with a 500 (or a stream cut short): refused by validation, or served."""
    body = {"model": gateway.model, "max_tokens": 4, **fields}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    response = httpx.post(f"{gateway.url}{path}", json=body, timeout=60)
    if param is None:
        assert response.status_code == 200, response.text
        assert not fields.get("stream") or response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
