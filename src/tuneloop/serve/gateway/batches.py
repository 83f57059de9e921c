"""The OpenAI Files + Batches API: upload a JSONL of requests, create a batch, poll it, download output and error
files, cancel it. Files and jobs live in the workspace (`serve/files/`, `serve/batches/`), results are appended as
they finish, and a restarted gateway resumes unfinished jobs without redoing finished requests — a restart loses none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

from tuneloop.serve.gateway.protocol import BatchEndpoint, error_body
from tuneloop.workspace import ServePaths

log = logging.getLogger("tuneloop.gateway")

BATCH_ENDPOINTS: tuple[str, ...] = get_args(BatchEndpoint)
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")


class BatchStore:
    """Uploaded files and batch jobs under the workspace's `serve/` folder (`ServePaths`)."""

    def __init__(self, paths: ServePaths, concurrency: int = 8) -> None:
        self.files = paths.files
        self.jobs = paths.batches
        self.files.mkdir(parents=True, exist_ok=True)
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency
        self.tasks: dict[str, asyncio.Task[None]] = {}

    # -- files ------------------------------------------------------------------------------------------------------
    def add_file(self, name: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        (self.files / f"{file_id}.data").write_bytes(content)
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }
        self._write(self.files / f"{file_id}.json", meta)
        return meta

    def file(self, file_id: str) -> dict[str, Any] | None:
        path = _stored(self.files, file_id, ".json")
        return json.loads(path.read_text()) if path is not None else None

    def file_content(self, file_id: str) -> bytes | None:
        path = _stored(self.files, file_id, ".data")
        return path.read_bytes() if path is not None else None

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def create(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, Any] | None
    ) -> dict[str, Any]:
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        output = self.add_file(f"{batch_id}_output.jsonl", "batch_output", b"")
        errors = self.add_file(f"{batch_id}_error.jsonl", "batch_output", b"")
        job = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": output["id"],
            "error_file_id": errors["id"],
            "created_at": int(time.time()),
            "in_progress_at": None,
            "completed_at": None,
            "cancelled_at": None,
            "failed_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata or {},
        }
        self.save(job)
        return job

    def get(self, batch_id: str) -> dict[str, Any] | None:
        path = _stored(self.jobs, batch_id, ".json")
        return json.loads(path.read_text()) if path is not None else None

    def all(self) -> list[dict[str, Any]]:
        return sorted((json.loads(p.read_text()) for p in self.jobs.glob("*.json")), key=lambda j: -j["created_at"])

    def save(self, job: dict[str, Any]) -> None:
        self._write(self.jobs / f"{job['id']}.json", job)

    def unfinished(self) -> list[dict[str, Any]]:
        return [job for job in self.all() if job["status"] in RUNNING]

    # -- running ------------------------------------------------------------------------------------------------------
    def start(self, job: dict[str, Any], handler: Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]) -> None:
        self.tasks[job["id"]] = asyncio.create_task(self._run(job["id"], handler))

    async def _run(self, batch_id: str, handler: Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]) -> None:
        job = self.get(batch_id)
        assert job is not None
        # Bytes that are not UTF-8 become a line that is not JSON: the job fails naming it, instead of its task dying.
        lines = (self.file_content(job["input_file_id"]) or b"").decode("utf-8", errors="replace").splitlines()
        requests = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                url, body = item.get("url", job["endpoint"]), item["body"]
                if not isinstance(url, str) or not isinstance(body, dict):
                    raise TypeError("`url` must be a string and `body` an object")
                requests.append((str(item["custom_id"]), url, body))
            except (ValueError, KeyError, TypeError) as error:
                job.update(
                    status="failed",
                    failed_at=int(time.time()),
                    errors={
                        "object": "list",
                        "data": [{"code": "invalid_request", "line": number, "message": f"line {number}: {error}"}],
                    },
                )
                self.save(job)
                return
        output_path = self.files / f"{job['output_file_id']}.data"
        error_path = self.files / f"{job['error_file_id']}.data"
        done = {
            json.loads(line)["custom_id"]
            for path in (output_path, error_path)
            for line in path.read_text().splitlines()
            if line.strip()
        }
        job["request_counts"]["total"] = len(requests)
        if job["status"] == "validating":
            job.update(status="in_progress", in_progress_at=int(time.time()))
        self.save(job)
        limit = asyncio.Semaphore(self.concurrency)
        lock = asyncio.Lock()

        async def one(custom_id: str, url: str, body: dict[str, Any]) -> None:
            async with limit:
                current = self.get(batch_id) or job
                if current["status"] == "cancelling":
                    return
                try:
                    status, response = await handler(url, body)
                except Exception as error:  # one broken request must not stall the whole job in `in_progress`
                    log.exception("batch %s: request %s failed", batch_id, custom_id)
                    status, response = 500, error_body(f"{type(error).__name__}: {error}", "server_error")
                record = {
                    "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                    "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": response},
                    "error": None,
                }
                async with lock:
                    target = output_path if status == 200 else error_path
                    with target.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                    fresh = self.get(batch_id) or job
                    fresh["request_counts"]["completed" if status == 200 else "failed"] += 1
                    self.save(fresh)

        await asyncio.gather(*(one(*request) for request in requests if request[0] not in done))
        job = self.get(batch_id) or job
        if job["status"] == "cancelling":
            job.update(status="cancelled", cancelled_at=int(time.time()))
        else:
            job.update(status="completed", completed_at=int(time.time()))
        for key in ("output_file_id", "error_file_id"):
            meta = self.file(job[key])
            if meta is not None:
                meta["bytes"] = (self.files / f"{job[key]}.data").stat().st_size
                self._write(self.files / f"{job[key]}.json", meta)
        self.save(job)

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(path)


def _stored(folder: Path, identifier: str, suffix: str) -> Path | None:
    """The file of an id, or None when there is none. Ids are ours (`file-…`, `batch_…`): anything else — a path
    separator, `..`, a name longer than the file system allows (an OSError, hence a 500) — names nothing."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", identifier):
        return None
    path = folder / f"{identifier}{suffix}"
    return path if path.is_file() else None
