"""The one-process backend (no `serve.state_url`): token buckets in memory, files and batch jobs as files under the
workspace's `serve/` folder, feedback in memory plus the JSON Lines file of ratings (rebuilt from it on start)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tuneloop.serve.gateway.stores.base import RUNNING, FileMeta, Job, Key, valid_id
from tuneloop.workspace import ServePaths

log = logging.getLogger("tuneloop.gateway")


class LocalTokenBuckets:
    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self.lock = threading.Lock()

    def take(self, key: str, capacity: float, per_second: float) -> tuple[bool, float]:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * per_second)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return True, 0.0
            self.buckets[key] = (tokens, now)
            return False, (1 - tokens) / per_second


class LocalBatchFiles:
    """Files (`<id>.data` + `<id>.json`) and jobs (`<id>.json`) in two folders. One process owns them: a claim always
    succeeds (the BatchStore runs a job once), and job updates need no lock (no await inside one)."""

    shared = False

    def __init__(self, paths: ServePaths) -> None:
        self.files = paths.files
        self.jobs_folder = paths.batches
        self.files.mkdir(parents=True, exist_ok=True)
        self.jobs_folder.mkdir(parents=True, exist_ok=True)

    # -- files ------------------------------------------------------------------------------------------------------
    def put_file(self, meta: FileMeta, content: bytes) -> None:
        (self.files / f"{meta['id']}.data").write_bytes(content)
        self.set_file_meta(meta)

    def set_file_meta(self, meta: FileMeta) -> None:
        _write(self.files / f"{meta['id']}.json", meta)

    def file_meta(self, file_id: str) -> FileMeta | None:
        path = _stored(self.files, file_id, ".json")
        return json.loads(path.read_text()) if path is not None else None

    def file_content(self, file_id: str) -> bytes | None:
        path = _stored(self.files, file_id, ".data")
        return path.read_bytes() if path is not None else None

    def file_size(self, file_id: str) -> int:
        path = _stored(self.files, file_id, ".data")
        return path.stat().st_size if path is not None else 0

    # -- jobs -------------------------------------------------------------------------------------------------------
    def save_job(self, job: Job) -> None:
        _write(self.jobs_folder / f"{job['id']}.json", job)

    def get_job(self, batch_id: str) -> Job | None:
        path = _stored(self.jobs_folder, batch_id, ".json")
        return json.loads(path.read_text()) if path is not None else None

    def jobs(self) -> list[Job]:
        found = (json.loads(path.read_text()) for path in self.jobs_folder.glob("*.json"))
        return sorted(found, key=lambda job: -job["created_at"])

    def unfinished_jobs(self) -> list[Job]:
        return [job for job in self.jobs() if job["status"] in RUNNING]

    def update_job(self, batch_id: str, changes: dict[str, Any], when: tuple[str, ...] = ()) -> bool:
        job = self.get_job(batch_id)
        if job is None or (when and job["status"] not in when):
            return False
        job.update(changes)
        self.save_job(job)
        return True

    def append_result(self, batch_id: str, owner: str, file_id: str, line: str, counter: str) -> bool:
        with (self.files / f"{file_id}.data").open("a", encoding="utf-8") as handle:
            handle.write(line)
        job = self.get_job(batch_id)
        if job is not None:
            job["request_counts"][counter] += 1
            self.save_job(job)
        return True

    def claim(self, batch_id: str, owner: str, lease_s: float) -> bool:
        return True

    def renew(self, batch_id: str, owner: str, lease_s: float) -> bool:
        return True

    def release(self, batch_id: str, owner: str) -> None:
        return None


class LocalFeedback:
    """Response ids (the newest `remember`) and served counts in memory; ratings in memory and appended to `path`
    (None: memory only), from which they are rebuilt when the store opens."""

    def __init__(self, path: Path | None, remember: int = 100_000) -> None:
        self.path = path
        self.responses: OrderedDict[str, Key] = OrderedDict()
        self.remember = remember
        self.lock = threading.Lock()
        self.served_counts: dict[Key, int] = {}
        self.ratings: dict[Key, list[bool]] = {}
        self.seen: dict[Key, None] = {}  # keys in the order first served or rated: a route's default control
        self.skipped_lines = 0
        # A crash mid-append can leave a last line without its newline: the next entry must not be glued onto it.
        self._needs_newline = False
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8", errors="replace")
        self._needs_newline = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                model, variant, positive = entry["model"], entry["variant"], entry["positive"]
            except (ValueError, TypeError, KeyError):
                self.skipped_lines += 1
                continue
            if not isinstance(model, str) or not isinstance(variant, str | None) or not isinstance(positive, bool):
                self.skipped_lines += 1
                continue
            self.ratings.setdefault((model, variant), []).append(positive)
            self.seen.setdefault((model, variant))
        if self.skipped_lines:
            log.warning("skipped %d malformed lines of %s", self.skipped_lines, path)

    def served(self, response_id: str, key: Key) -> None:
        with self.lock:
            self.responses[response_id] = key
            if len(self.responses) > self.remember:
                self.responses.popitem(last=False)
            self.served_counts[key] = self.served_counts.get(key, 0) + 1
            self.seen.setdefault(key)

    def lookup(self, response_id: str) -> Key | None:
        with self.lock:
            return self.responses.get(response_id)

    def add_rating(self, key: Key, entry: dict[str, Any]) -> None:
        with self.lock:
            self.ratings.setdefault(key, []).append(entry["positive"])
            self.seen.setdefault(key)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(("\n" if self._needs_newline else "") + json.dumps(entry) + "\n")
                self._needs_newline = False

    def totals(self) -> tuple[list[Key], dict[Key, int], dict[Key, tuple[int, int]]]:
        with self.lock:
            counts = {key: (sum(values), len(values)) for key, values in self.ratings.items()}
            return list(self.seen), dict(self.served_counts), counts


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data), encoding="utf-8")
    temporary.replace(path)


def _stored(folder: Path, identifier: str, suffix: str) -> Path | None:
    """The file of an id, or None when there is none (or the id is not one of ours)."""
    if not valid_id(identifier):
        return None
    path = folder / f"{identifier}{suffix}"
    return path if path.is_file() else None
