"""The OpenAI Files + Batches API: upload a JSONL of requests, create a batch, poll it, download output and error
files, cancel it. Files and jobs live in a `BatchBackend` (stores/): the workspace (`serve/files/`, `serve/batches/`)
for one gateway, or Redis shared by replicas. Results are appended as they finish, and an unfinished job is resumed
without redoing finished requests — by the same gateway after a restart, or under Redis by any replica once the lease
of the replica running it runs out (it died) — so an accepted batch loses none.

Under Redis a job runs on the replica that claims it: the one that accepted it, at once; the others look for jobs
whose lease expired every third of a lease. The owner renews its lease as often, and each result is appended only
while it still holds the lease, so a replica that lost it (stalled past the lease) cannot add a line the next owner
also adds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

from tuneloop.serve.gateway.protocol import BatchEndpoint, error_body
from tuneloop.serve.gateway.stores.base import DEFAULT_LEASE_S, RUNNING, BatchBackend, FileMeta, Job
from tuneloop.serve.gateway.stores.local import LocalBatchFiles
from tuneloop.workspace import ServePaths

log = logging.getLogger("tuneloop.gateway")

BATCH_ENDPOINTS: tuple[str, ...] = get_args(BatchEndpoint)
Handler = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]  # (url, body) -> (status, response body)


class BatchStore:
    """Files and batch jobs in `storage` (a workspace's `ServePaths`: local files), and the jobs this process runs."""

    def __init__(
        self, storage: ServePaths | BatchBackend, concurrency: int = 64, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        self.backend: BatchBackend = LocalBatchFiles(storage) if isinstance(storage, ServePaths) else storage
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this replica, in leases
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def files(self) -> Path:
        """The folder of uploaded files (local backend only)."""
        if not isinstance(self.backend, LocalBatchFiles):
            raise AttributeError("files are kept in the shared store (serve.state_url), not in a folder")
        return self.backend.files

    # -- files ------------------------------------------------------------------------------------------------------
    def add_file(self, name: str, purpose: str, content: bytes) -> FileMeta:
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }
        self.backend.put_file(meta, content)
        return meta

    def file(self, file_id: str) -> FileMeta | None:
        return self.backend.file_meta(file_id)

    def file_content(self, file_id: str) -> bytes | None:
        return self.backend.file_content(file_id)

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def create(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, Any] | None) -> Job:
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

    def get(self, batch_id: str) -> Job | None:
        return self.backend.get_job(batch_id)

    def all(self) -> list[Job]:
        return self.backend.jobs()

    def save(self, job: Job) -> None:
        self.backend.save_job(job)

    def unfinished(self) -> list[Job]:
        return self.backend.unfinished_jobs()

    def cancel(self, batch_id: str) -> Job | None:
        """Ask a job to stop (its runner, on whichever replica, sees it before each request): the job, or None."""
        self.backend.update_job(batch_id, {"status": "cancelling"}, when=("validating", "in_progress"))
        return self.get(batch_id)

    # -- running ------------------------------------------------------------------------------------------------------
    def start(self, job: Job, handler: Handler) -> bool:
        """Run `job` here if no one runs it (this process, or under Redis a replica holding its lease)."""
        batch_id = job["id"]
        if batch_id in self.tasks or not self.backend.claim(batch_id, self.owner, self.lease_s):
            return False
        task = asyncio.create_task(self._run(batch_id, handler))
        self.tasks[batch_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(batch_id, None))
        return True

    def resume(self, handler: Handler) -> int:
        """Start every unfinished job no one runs (at start; a restart loses no job): how many were started."""
        return sum(self.start(job, handler) for job in self.unfinished())

    async def keep_resuming(self, handler: Handler) -> None:
        """Under a shared store, take over the jobs of replicas that stopped renewing their lease (they died)."""
        if not self.backend.shared:
            return
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if started := self.resume(handler):
                    log.info("took over %d batch job(s) whose lease had run out", started)
            except Exception:  # the store is down for a moment: try again next round
                log.exception("looking for batch jobs to take over failed")

    async def stop(self) -> None:
        """Stop the jobs running here, releasing their leases so another replica resumes them without waiting."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str, handler: Handler) -> None:
        keeper = (
            asyncio.create_task(self._keep_lease(batch_id, asyncio.current_task())) if self.backend.shared else None
        )
        try:
            await self._process(batch_id, handler)
        finally:
            if keeper is not None:
                keeper.cancel()
            try:
                self.backend.release(batch_id, self.owner)
            except Exception:  # the lease then runs out by itself
                log.exception("batch %s: releasing its lease failed", batch_id)

    async def _keep_lease(self, batch_id: str, runner: asyncio.Task[Any] | None) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                kept = self.backend.renew(batch_id, self.owner, self.lease_s)
            except Exception:  # the store did not answer: the fenced appends decide whether the lease still holds
                log.exception("batch %s: renewing its lease failed", batch_id)
                continue
            if not kept and runner is not None:
                log.warning("batch %s: lease lost, stopping here", batch_id)
                runner.cancel()
                return

    async def _process(self, batch_id: str, handler: Handler) -> None:
        job = self.get(batch_id)
        if job is None or job["status"] not in RUNNING:  # finished meanwhile (by another replica)
            return
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
                failure = {"code": "invalid_request", "line": number, "message": f"line {number}: {error}"}
                changes = {
                    "status": "failed",
                    "failed_at": int(time.time()),
                    "errors": {"object": "list", "data": [failure]},
                }
                self.backend.update_job(batch_id, changes, when=RUNNING)
                return
        done = {
            json.loads(line)["custom_id"]
            for file_id in (job["output_file_id"], job["error_file_id"])
            for line in (self.file_content(file_id) or b"").decode("utf-8", errors="replace").splitlines()
            if line.strip()
        }
        self.backend.update_job(batch_id, {"request_counts": {**job["request_counts"], "total": len(requests)}})
        self.backend.update_job(
            batch_id, {"status": "in_progress", "in_progress_at": int(time.time())}, when=("validating",)
        )
        limit = asyncio.Semaphore(self.concurrency)
        lost = False  # another replica took the job over: stop working on it

        async def one(custom_id: str, url: str, body: dict[str, Any]) -> None:
            nonlocal lost
            async with limit:
                current = self.get(batch_id)
                if lost or current is None or current["status"] == "cancelling":
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
                target, counter = (
                    (job["output_file_id"], "completed") if status == 200 else (job["error_file_id"], "failed")
                )
                if not self.backend.append_result(batch_id, self.owner, target, json.dumps(record) + "\n", counter):
                    lost = True

        await asyncio.gather(*(one(*request) for request in requests if request[0] not in done))
        if lost:
            log.warning("batch %s: another gateway replica took it over", batch_id)
            return
        for file_id in (job["output_file_id"], job["error_file_id"]):  # sizes first: `completed` means final files
            meta = self.file(file_id)
            if meta is not None:
                self.backend.set_file_meta({**meta, "bytes": self.backend.file_size(file_id)})
        now = int(time.time())
        if not self.backend.update_job(batch_id, {"status": "cancelled", "cancelled_at": now}, when=("cancelling",)):
            self.backend.update_job(batch_id, {"status": "completed", "completed_at": now}, when=RUNNING)
