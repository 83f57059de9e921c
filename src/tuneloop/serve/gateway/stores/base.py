"""What the gateway keeps between requests, as three small storage interfaces with one implementation per backend
(local.py: this process and the workspace; redis_backend.py: Redis, shared by gateway replicas).

- `TokenBuckets`: per-key token buckets (rate limits); a take is atomic.
- `BatchBackend`: uploaded files, batch jobs, result lines and the lease that says which replica runs a job.
- `FeedbackBackend`: served response id -> (model, variant), served counts and ratings.

The logic on top (RateLimiter, BatchStore, FeedbackStore) is the same whatever the backend.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

Key = tuple[str, str | None]  # (model asked for, variant): what feedback is counted per
Job = dict[str, Any]  # an OpenAI batch object, as /v1/batches returns it
FileMeta = dict[str, Any]  # an OpenAI file object, as /v1/files returns it

RUNNING = ("validating", "in_progress", "finalizing", "cancelling")  # statuses of a batch not yet finished
DEFAULT_LEASE_S = 30.0  # how long a replica's claim on a batch job lasts without renewal


def valid_id(identifier: str) -> bool:
    """Ids are ours (`file-…`, `batch_…`): anything else — a path separator, `..`, a name longer than a file system
    allows — names nothing, in every backend."""
    return re.fullmatch(r"[A-Za-z0-9_-]{1,100}", identifier) is not None


class TokenBuckets(Protocol):
    def take(self, key: str, capacity: float, per_second: float) -> tuple[bool, float]:
        """Take one token from `key`'s bucket (full at first, refilled at `per_second` up to `capacity`):
        (allowed, seconds until a token would be there)."""
        ...


class BatchBackend(Protocol):
    shared: bool  # other processes see the same jobs: they are claimed with a lease and resumed when it runs out

    def put_file(self, meta: FileMeta, content: bytes) -> None: ...
    def set_file_meta(self, meta: FileMeta) -> None: ...
    def file_meta(self, file_id: str) -> FileMeta | None: ...
    def file_content(self, file_id: str) -> bytes | None: ...
    def file_size(self, file_id: str) -> int: ...

    def save_job(self, job: Job) -> None: ...
    def get_job(self, batch_id: str) -> Job | None: ...
    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        ...

    def unfinished_jobs(self) -> list[Job]: ...
    def update_job(self, batch_id: str, changes: dict[str, Any], when: tuple[str, ...] = ()) -> bool:
        """Set top-level fields of a job atomically, only while its status is one of `when` (any when empty):
        whether it was changed."""
        ...

    def append_result(self, batch_id: str, owner: str, file_id: str, line: str, counter: str) -> bool:
        """Append `line` to a result file and count it in `request_counts[counter]`, only while `owner` still holds
        the job's lease (a replica whose lease ran out must not add what the next owner redoes): whether it did."""
        ...

    def claim(self, batch_id: str, owner: str, lease_s: float) -> bool: ...
    def renew(self, batch_id: str, owner: str, lease_s: float) -> bool: ...
    def release(self, batch_id: str, owner: str) -> None: ...


class FeedbackBackend(Protocol):
    skipped_lines: int  # malformed entries skipped when the store was opened

    def served(self, response_id: str, key: Key) -> None:
        """Remember which model and variant answered `response_id`, and count the response."""
        ...

    def lookup(self, response_id: str) -> Key | None: ...
    def add_rating(self, key: Key, entry: dict[str, Any]) -> None: ...
    def totals(self) -> tuple[list[Key], dict[Key, int], dict[Key, tuple[int, int]]]:
        """Keys in the order first served or rated, served responses per key, (positive, rated) per key."""
        ...
