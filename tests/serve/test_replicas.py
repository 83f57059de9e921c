"""Gateway replicas sharing their state through a real Redis (`serve.state_url`).

Unit level, against a redis-server started here: the token bucket (refill, atomic takes from many threads and two
clients), feedback shared by two store objects, batch jobs (leases, fenced appends) with the local backend beside it.
End to end, two real `tuneloop serve` processes (in-process engine, tiny model) on one Redis, each with a workspace of
its own so Redis is all they share: a per-key rate limit, a batch submitted to one and completed and downloaded from
the other, and one replica SIGKILLed mid-load — no accepted request lost, its batch finished by the survivor.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.redis_server import running_redis
from tests.serve.servers import ServeProcess, server_output, start_serve, wait_ready
from tuneloop.errors import TuneloopError
from tuneloop.serve.gateway.batches import BatchStore
from tuneloop.serve.gateway.feedback import FeedbackRequest, FeedbackStore
from tuneloop.serve.gateway.stores import open_stores
from tuneloop.workspace import Workspace

LEASE_S = 2.0  # the replicas' batch lease in these tests (production: 30 s)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client on an emptied database: each test starts from nothing."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def database(url: str, number: int) -> str:
    """The same server, another database: each set of replicas gets one (and its batches) to itself."""
    return url.rsplit("/", 1)[0] + f"/{number}"


# -- unit level -----------------------------------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate(redis_client: Any) -> None:
    from tuneloop.serve.gateway.stores.redis_backend import RedisTokenBuckets

    buckets = RedisTokenBuckets(redis_client)
    taken = [buckets.take("alpha", 3, 5.0) for _ in range(4)]  # 3 tokens, 5 per second back
    assert [allowed for allowed, _ in taken] == [True, True, True, False]
    wait = taken[-1][1]
    assert 0 < wait <= 0.2
    assert buckets.take("beta", 3, 5.0)[0]  # another key has a bucket of its own
    time.sleep(wait + 0.05)
    assert buckets.take("alpha", 3, 5.0)[0]
    assert not buckets.take("alpha", 3, 5.0)[0]
    assert not any(b"alpha" in key for key in redis_client.keys("*"))  # keys are hashed: no API key in Redis


def test_token_bucket_takes_are_atomic_across_threads_and_clients(redis_url: str, redis_client: Any) -> None:
    """8 threads on two clients (two replicas) take 400 times from a bucket of 100 that barely refills."""
    import redis

    from tuneloop.serve.gateway.stores.redis_backend import RedisTokenBuckets

    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    replicas = [RedisTokenBuckets(client) for client in clients]
    allowed = []
    lock = threading.Lock()

    def take(thread: int) -> None:
        mine = sum(replicas[thread % 2].take("shared", 100, 1e-4)[0] for _ in range(50))
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 100
    for client in clients:
        client.close()


def test_feedback_is_shared_between_two_stores(redis_url: str, redis_client: Any) -> None:
    import redis

    from tuneloop.serve.gateway.stores.redis_backend import RedisFeedback

    first, second = (FeedbackStore(RedisFeedback(redis.Redis.from_url(redis_url))) for _ in range(2))
    first.served_response("r1", "extractor", "champion")
    first.served_response("r2", "extractor", "challenger")
    second.served_response("r3", "extractor", "challenger")
    assert second.record(FeedbackRequest(response_id="r1", rating="up")) is not None  # served by the other
    assert first.record(FeedbackRequest(response_id="r3", rating=2)) is not None
    assert first.record(FeedbackRequest(response_id="r2", rating=5))["variant"] == "challenger"  # type: ignore[index]
    assert second.record(FeedbackRequest(response_id="never-served", rating="up")) is None
    summary = first.summary({"extractor": "champion"})
    assert summary == second.summary({"extractor": "champion"})
    rows = {row["variant"]: row for row in summary}
    assert (rows["champion"]["responses"], rows["champion"]["ratings"], rows["champion"]["positive"]) == (1, 1, 1)
    assert (rows["challenger"]["responses"], rows["challenger"]["ratings"], rows["challenger"]["positive"]) == (2, 2, 1)
    assert rows["challenger"]["vs_control"]["control"] == "champion"
    entries = [json.loads(raw) for raw in redis_client.lrange("tuneloop:feedback:entries", 0, -1)]
    assert [entry["response_id"] for entry in entries] == ["r1", "r3", "r2"]


def test_when_redis_is_down_requests_are_let_through_and_answers_still_go_out() -> None:
    """Rate limits fail open and a served response id is skipped; after one failure the breaker skips Redis."""
    import redis

    from tuneloop.net import free_port
    from tuneloop.serve.gateway.stores.redis_backend import RedisFeedback, RedisTokenBuckets

    nobody = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    buckets, feedback = RedisTokenBuckets(nobody), RedisFeedback(nobody)
    assert buckets.take("alpha", 1, 1.0) == (True, 0.0) and buckets.breaker.is_open()
    started = time.monotonic()
    assert all(buckets.take("alpha", 1, 1.0)[0] for _ in range(100))
    feedback.served("r1", ("m", None))  # no exception: the answer is not held up
    assert feedback.breaker.is_open() and time.monotonic() - started < 1


@pytest.fixture(params=["local", "redis"])
def batch_store(request: pytest.FixtureRequest, tmp_path: Path) -> BatchStore:
    """A BatchStore on either backend: both must behave the same."""
    if request.param == "local":
        return BatchStore(Workspace(tmp_path).serve)
    from tuneloop.serve.gateway.stores.redis_backend import RedisBatchFiles

    return BatchStore(RedisBatchFiles(request.getfixturevalue("redis_client")))


def test_batch_store_behaves_the_same_on_both_backends(batch_store: BatchStore) -> None:
    content = b'{"custom_id": "a", "body": {}}\n'
    upload = batch_store.add_file("in.jsonl", "batch", content)
    assert batch_store.file(upload["id"]) == upload and batch_store.file_content(upload["id"]) == content
    assert batch_store.file("file-missing") is None and batch_store.file_content("../etc/passwd") is None
    first = batch_store.create(upload["id"], "/v1/chat/completions", "24h", {"team": "x"})
    time.sleep(1.01)  # created_at has one-second resolution: the second job is newer
    second = batch_store.create(upload["id"], "/v1/chat/completions", "24h", None)
    assert batch_store.get(first["id"]) == first
    assert [job["id"] for job in batch_store.all()] == [second["id"], first["id"]]
    assert {job["id"] for job in batch_store.unfinished()} == {first["id"], second["id"]}
    assert batch_store.cancel(first["id"])["status"] == "cancelling"  # type: ignore[index]
    backend = batch_store.backend
    assert not backend.update_job(first["id"], {"status": "completed"}, when=("in_progress",))
    assert backend.update_job(first["id"], {"status": "cancelled", "cancelled_at": 1}, when=("cancelling",))
    assert batch_store.cancel(first["id"])["status"] == "cancelled"  # type: ignore[index]  # a finished job stays
    assert [job["id"] for job in batch_store.unfinished()] == [second["id"]]
    assert backend.claim(second["id"], batch_store.owner, 30)  # results are appended by the job's owner
    assert backend.append_result(second["id"], batch_store.owner, second["output_file_id"], '{"x": 1}\n', "completed")
    assert batch_store.file_content(second["output_file_id"]) == b'{"x": 1}\n'
    assert batch_store.get(second["id"])["request_counts"] == {"total": 0, "completed": 1, "failed": 0}  # type: ignore[index]


def test_leases_let_one_replica_run_a_job_and_fence_the_one_that_lost_it(redis_client: Any) -> None:
    from tuneloop.serve.gateway.stores.redis_backend import RedisBatchFiles

    backend = RedisBatchFiles(redis_client)
    store = BatchStore(backend)
    job = store.create(store.add_file("in.jsonl", "batch", b"")["id"], "/v1/chat/completions", "24h", None)
    assert backend.claim(job["id"], "A", 0.3)
    assert not backend.claim(job["id"], "B", 0.3)  # A holds it
    assert backend.renew(job["id"], "A", 0.3) and not backend.renew(job["id"], "B", 0.3)
    assert backend.append_result(job["id"], "A", job["output_file_id"], "a\n", "completed")
    time.sleep(0.4)  # A stopped renewing (it died, or stalled past its lease)
    assert backend.claim(job["id"], "B", 0.3)
    assert not backend.append_result(job["id"], "A", job["output_file_id"], "late\n", "completed")  # fenced
    assert backend.append_result(job["id"], "B", job["output_file_id"], "b\n", "completed")
    assert store.file_content(job["output_file_id"]) == b"a\nb\n"
    assert store.get(job["id"])["request_counts"]["completed"] == 2  # type: ignore[index]
    backend.release(job["id"], "A")  # not A's any more: B keeps it
    assert not backend.claim(job["id"], "C", 0.3)
    backend.release(job["id"], "B")
    assert backend.claim(job["id"], "C", 0.3)


def test_a_bad_state_url_is_a_clear_error(tmp_path: Path) -> None:
    from tuneloop.net import free_port

    paths = Workspace(tmp_path).serve
    with pytest.raises(TuneloopError, match=r"serve\.state_url") as wrong_scheme:
        open_stores("postgres://user:secret@db:5432/x", paths)
    assert "secret" not in str(wrong_scheme.value)
    with pytest.raises(TuneloopError, match=r"serve\.state_url: Redis at redis://127\.0\.0\.1:\d+/0 did not answer"):
        open_stores(f"redis://127.0.0.1:{free_port()}/0", paths)
    local = open_stores(None, paths)  # unset: this process and the workspace, as before
    assert local.batches.files == paths.files and local.feedback.backend.path == paths.feedback  # type: ignore[attr-defined]


# -- two real gateway processes -------------------------------------------------------------------------------------
def write_serve_config(folder: Path, model: Path, redis_url: str, **serve: Any) -> Path:
    config = {
        "model": {"base": str(model)},
        "serve": {"engine": "transformers", "precision": "fp32", "state_url": redis_url, **serve},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start_replicas(
    folder: Path, model: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, **serve: Any
) -> list[tuple[ServeProcess, str]]:
    """Two `tuneloop serve` processes on one Redis, each with a workspace of its own."""
    config = write_serve_config(folder, model, redis_url, **serve)
    monkeypatch.setenv("TUNELOOP_STATE_LEASE_S", str(LEASE_S))
    replicas = [start_serve(config, folder / name / "ws") for name in ("a", "b")]
    for process, url in replicas:
        wait_ready(url, process)
    return replicas


def stop(replicas: list[tuple[ServeProcess, str]]) -> None:
    for process, _ in replicas:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, _ in replicas:
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, redis_url: str) -> Iterator[list[str]]:
    """Two replicas with a limit of 20 requests a minute per API key."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        started = start_replicas(
            tmp_path_factory.mktemp("replicas"),
            tiny_model_dir,
            database(redis_url, 1),
            monkeypatch,
            api_keys=["alpha", "beta", "gamma"],
            rate_limit_per_minute=20,
        )
    try:
        yield [url for _, url in started]
    finally:
        stop(started)


@pytest.mark.slow
def test_replicas_share_a_per_key_rate_limit(replicas: list[str]) -> None:
    alpha = {"Authorization": "Bearer alpha"}
    statuses = [httpx.get(f"{replicas[i % 2]}/v1/models", headers=alpha).status_code for i in range(20)]
    assert statuses == [200] * 20  # 10 through each replica, one bucket of 20 (refilled one per 3 s)
    for url in replicas:  # the 21st is refused on either
        refused = httpx.get(f"{url}/v1/models", headers=alpha)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
    assert httpx.get(f"{replicas[1]}/v1/models", headers={"Authorization": "Bearer beta"}).status_code == 200


@pytest.mark.slow
def test_a_response_served_by_one_replica_is_rated_through_the_other(replicas: list[str], tiny_model_dir: Path) -> None:
    beta = {"Authorization": "Bearer beta"}
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    served = httpx.post(f"{replicas[0]}/v1/chat/completions", json=body, headers=beta, timeout=60).json()
    rated = httpx.post(f"{replicas[1]}/v1/feedback", json={"response_id": served["id"], "rating": "up"}, headers=beta)
    assert rated.status_code == 200 and rated.json()["positive"] is True
    summaries = [httpx.get(f"{url}/v1/feedback/summary", headers=beta).json()["data"] for url in replicas]
    assert summaries[0] == summaries[1]
    (row,) = [row for row in summaries[0] if row["model"] == str(tiny_model_dir)]
    assert (row["responses"], row["ratings"], row["positive"]) == (1, 1, 1)


@pytest.mark.slow
def test_a_batch_submitted_to_one_replica_is_seen_completed_and_downloaded_from_the_other(
    replicas: list[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    # The SDK's own retries wait out a 429 (Retry-After) should polling outrun the limit.
    first, second = (OpenAI(base_url=f"{url}/v1", api_key="gamma", max_retries=5) for url in replicas)
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in batch_lines(tiny_model_dir, 4)))
    uploaded = first.files.create(file=path.open("rb"), purpose="batch")
    batch = first.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert second.batches.retrieve(batch.id).input_file_id == uploaded.id
    assert any(item.id == batch.id for item in second.batches.list().data)
    batch = wait_finished(second, batch.id, 120)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 4, 0)
    output = [json.loads(line) for line in second.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == [f"req-{i}" for i in range(4)]
    assert all(item["response"]["body"]["object"] == "chat.completion" for item in output)
    assert second.files.retrieve(batch.output_file_id).bytes == len(second.files.content(batch.output_file_id).content)


@pytest.mark.slow
def test_killing_a_replica_mid_load_loses_no_accepted_request(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sends requests round-robin, retrying a failed one on the other replica; replica A is SIGKILLed
    mid-load, right after accepting a batch. Every request is answered, and B completes A's batch once A's lease
    has run out, each request once."""
    import redis
    from openai import OpenAI

    state_url = database(redis_url, 2)
    redis.Redis.from_url(state_url).flushdb()
    started = start_replicas(tmp_path, tiny_model_dir, state_url, monkeypatch)
    (victim, victim_url), (survivor, survivor_url) = started
    urls = [victim_url, survivor_url]
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    requests_total, answered, retried = 60, [], []
    lock = threading.Lock()

    def send(number: int) -> None:
        first = number % 2
        for attempt, url in enumerate((urls[first], urls[1 - first])):
            try:
                response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                if response.status_code == 200 and response.json()["choices"]:
                    with lock:
                        answered.append(number)
                        if attempt:
                            retried.append(number)
                    return
            except httpx.TransportError:  # connection refused or cut: the replica died
                pass

    try:
        path = tmp_path / "batch.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in batch_lines(tiny_model_dir, 24, max_tokens=16)))
        client_a = OpenAI(base_url=f"{victim_url}/v1", api_key="none", max_retries=0)
        uploaded = client_a.files.create(file=path.open("rb"), purpose="batch")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, number) for number in range(requests_total)]
            deadline = time.time() + 120
            while len(answered) < 12 and time.time() < deadline:  # mid-load
                time.sleep(0.01)
            batch = client_a.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            victim.send_signal(signal.SIGKILL)
            for future in futures:
                future.result()
        survivor_client = OpenAI(base_url=f"{survivor_url}/v1", api_key="none", max_retries=2)
        seen = survivor_client.batches.retrieve(batch.id)
        assert seen.status != "completed", "the batch finished before its replica was killed: make it longer"
        lease_holder = redis.Redis.from_url(state_url).get(f"tuneloop:batch:{batch.id}:lease")
        print(
            f"\n{len(answered)}/{requests_total} requests answered, {len(retried)} retried on the other replica; "
            f"batch {seen.request_counts.completed}/24 done when A was killed, lease held by {lease_holder!r}"
        )
        assert sorted(answered) == list(range(requests_total))  # every request answered, once
        assert retried, "no request went to the killed replica"
        finished = wait_finished(survivor_client, batch.id, 180)
        assert finished.status == "completed", server_output(survivor)
        output = survivor_client.files.content(finished.output_file_id).text.splitlines()
        ids = [json.loads(line)["custom_id"] for line in output]
        assert sorted(ids) == sorted(f"req-{i}" for i in range(24))  # none lost, none done twice
        assert (finished.request_counts.completed, finished.request_counts.failed) == (24, 0)
    finally:
        stop(started)


def batch_lines(model: Path, count: int, max_tokens: int = 4) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": str(model),
                "messages": [{"role": "user", "content": f"Repeat {i}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i in range(count)
    ]


def wait_finished(client: Any, batch_id: str, seconds: float) -> Any:
    deadline = time.time() + seconds
    batch = client.batches.retrieve(batch_id)
    while batch.status not in ("completed", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch_id)
    return batch
