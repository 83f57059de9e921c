"""The Redis backend (`serve.state_url: redis://HOST:PORT/DB`): what several gateway replicas share.

Every key starts with `tuneloop:`. Operations that read and then write run as Lua scripts, so replicas never
interleave inside one: a token-bucket take, a conditional job update, a result append fenced by the job's lease.
The client is redis-py's synchronous one (the gateway's callers are synchronous); each call is one round trip to a
nearby server, well under a millisecond.

Keys:
  ratelimit:<sha256 of the API key>     hash tokens, time (Redis's clock, so replicas' clocks do not matter)
  file:<id>:meta, file:<id>:data        an uploaded or result file (results are APPENDed to :data)
  batch:<id>                            hash: one JSON-encoded field per top-level job field, request counts as ints
  batch:<id>:lease                      the replica running the job (SET NX PX, renewed while it runs)
  batches (sorted by creation), batches:open (not finished yet)
  feedback:response:<id>                [model, variant] of a served response (expires after `remember_s`)
  feedback:served|rated|positive        hashes per [model, variant]; feedback:seen: keys by first use;
  feedback:entries                      every rating entry, as feedback.jsonl holds them locally
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tuneloop.errors import TuneloopError
from tuneloop.serve.gateway.stores.base import RUNNING, FileMeta, Job, Key, valid_id

log = logging.getLogger("tuneloop.gateway")

PREFIX = "tuneloop:"
SCHEMES = ("redis", "rediss", "unix")
COUNTERS = ("total", "completed", "failed")  # request_counts, kept as integer fields so HINCRBY can count them
REMEMBER_RESPONSES_S = 24 * 3600  # how long a served response id can be rated

TAKE_TOKEN = """
local capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or capacity)
local last = tonumber(redis.call('HGET', KEYS[1], 'time') or now)
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local allowed, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'time', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""

UPDATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local allowed = tonumber(ARGV[1])
if allowed > 0 then
  local status, ok = redis.call('HGET', KEYS[1], 'status'), false
  for i = 2, allowed + 1 do if ARGV[i] == status then ok = true end end
  if not ok then return 0 end
end
for i = allowed + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

APPEND_RESULT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('APPEND', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return 1
"""

RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def connect(url: str) -> Any:
    """A client for `serve.state_url`, checked with a PING: a TuneloopError naming the field when the URL is not a
    Redis one or nobody answers there."""
    shown = redacted(url)
    if urlsplit(url).scheme not in SCHEMES:
        raise TuneloopError(
            f"serve.state_url={shown!r} is not a Redis URL",
            hint="write redis://HOST:6379/0 (rediss:// for TLS), or leave serve.state_url unset to keep the "
            "gateway's state in this process and the workspace",
        )
    try:
        import redis
    except ImportError:
        raise TuneloopError(
            "serve.state_url needs the `redis` package", hint="pip install 'tuneloop[serve]' (or `pip install redis`)"
        ) from None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5, health_check_interval=30)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as error:
        raise TuneloopError(
            f"serve.state_url: Redis at {shown} did not answer: {error}",
            hint="start it (Debian: apt-get install redis-server) or correct serve.state_url; "
            "leave it unset for a single gateway",
        ) from None
    return client


def redacted(url: str) -> str:
    """The URL without its password (error messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class _Breaker:
    """After a Redis failure, skips the calls a request can do without (rate-limit takes, response ids) for `pause`
    seconds: during a network partition each would otherwise wait out the socket timeout, request after request. One
    warning per failure, not one per request."""

    def __init__(self, what: str, pause: float = 5.0) -> None:
        self.what = what
        self.pause = pause
        self.until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.until

    def trip(self, error: Exception) -> None:
        self.until = time.monotonic() + self.pause
        log.warning("%s for %.0f s: Redis (serve.state_url) failed: %s", self.what, self.pause, error)


class RedisTokenBuckets:
    """A take is one Lua script: replicas (and threads) never both spend the last token. When Redis fails, requests
    are let through (a warning is logged): availability over the limit while the store is down."""

    def __init__(self, client: Any) -> None:
        import redis

        self.client = client
        self.script = client.register_script(TAKE_TOKEN)
        self.errors = redis.RedisError
        self.breaker = _Breaker("rate limits not enforced")

    def take(self, key: str, capacity: float, per_second: float) -> tuple[bool, float]:
        if self.breaker.is_open():
            return True, 0.0
        bucket = PREFIX + "ratelimit:" + hashlib.sha256(key.encode()).hexdigest()[:32]  # no API key in Redis
        try:
            allowed, wait = self.script(keys=[bucket], args=[capacity, per_second])
        except self.errors as error:
            self.breaker.trip(error)
            return True, 0.0
        return bool(allowed), float(wait)


class RedisBatchFiles:
    shared = True

    def __init__(self, client: Any) -> None:
        self.client = client
        self.update_script = client.register_script(UPDATE_JOB)
        self.append_script = client.register_script(APPEND_RESULT)
        self.renew_script = client.register_script(RENEW_LEASE)
        self.release_script = client.register_script(RELEASE_LEASE)

    # -- files ------------------------------------------------------------------------------------------------------
    def put_file(self, meta: FileMeta, content: bytes) -> None:
        with self.client.pipeline() as pipe:  # MULTI: the meta never names content that is not there yet
            pipe.set(_file(meta["id"], "data"), content)
            pipe.set(_file(meta["id"], "meta"), json.dumps(meta))
            pipe.execute()

    def set_file_meta(self, meta: FileMeta) -> None:
        self.client.set(_file(meta["id"], "meta"), json.dumps(meta))

    def file_meta(self, file_id: str) -> FileMeta | None:
        raw = self.client.get(_file(file_id, "meta")) if valid_id(file_id) else None
        return json.loads(raw) if raw is not None else None

    def file_content(self, file_id: str) -> bytes | None:
        if not valid_id(file_id) or not self.client.exists(_file(file_id, "meta")):
            return None
        return self.client.get(_file(file_id, "data")) or b""

    def file_size(self, file_id: str) -> int:
        return int(self.client.strlen(_file(file_id, "data")))

    # -- jobs -------------------------------------------------------------------------------------------------------
    def save_job(self, job: Job) -> None:
        fields = _job_fields(job)
        with self.client.pipeline() as pipe:
            pipe.delete(_job(job["id"]))
            pipe.hset(_job(job["id"]), mapping=fields)
            pipe.zadd(PREFIX + "batches", {job["id"]: job["created_at"]})
            if job["status"] in RUNNING:
                pipe.sadd(PREFIX + "batches:open", job["id"])
            else:
                pipe.srem(PREFIX + "batches:open", job["id"])
            pipe.execute()

    def get_job(self, batch_id: str) -> Job | None:
        if not valid_id(batch_id):
            return None
        return _job_from(self.client.hgetall(_job(batch_id)))

    def jobs(self) -> list[Job]:
        return self._jobs(self.client.zrevrange(PREFIX + "batches", 0, -1))

    def unfinished_jobs(self) -> list[Job]:
        found = self._jobs(self.client.smembers(PREFIX + "batches:open"))
        finished = {job["id"] for job in found if job["status"] not in RUNNING}
        if finished:  # the set is a hint kept beside the jobs: heal it
            self.client.srem(PREFIX + "batches:open", *finished)
        return sorted((job for job in found if job["id"] not in finished), key=lambda job: job["created_at"])

    def _jobs(self, ids: Any) -> list[Job]:
        with self.client.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(_job(batch_id.decode()))
            found = [_job_from(fields) for fields in pipe.execute()]
        return [job for job in found if job is not None]

    def update_job(self, batch_id: str, changes: dict[str, Any], when: tuple[str, ...] = ()) -> bool:
        pairs = [item for field, value in _job_fields(changes).items() for item in (field, value)]
        statuses = [json.dumps(status) for status in when]
        changed = bool(self.update_script(keys=[_job(batch_id)], args=[len(statuses), *statuses, *pairs]))
        if changed and "status" in changes and changes["status"] not in RUNNING:
            self.client.srem(PREFIX + "batches:open", batch_id)
        return changed

    def append_result(self, batch_id: str, owner: str, file_id: str, line: str, counter: str) -> bool:
        keys = [_lease(batch_id), _file(file_id, "data"), _job(batch_id)]
        return bool(self.append_script(keys=keys, args=[owner, line, f"request_counts.{counter}"]))

    def claim(self, batch_id: str, owner: str, lease_s: float) -> bool:
        return bool(self.client.set(_lease(batch_id), owner, nx=True, px=_milliseconds(lease_s)))

    def renew(self, batch_id: str, owner: str, lease_s: float) -> bool:
        return bool(self.renew_script(keys=[_lease(batch_id)], args=[owner, _milliseconds(lease_s)]))

    def release(self, batch_id: str, owner: str) -> None:
        self.release_script(keys=[_lease(batch_id)], args=[owner])


class RedisFeedback:
    """Response ids expire after `remember_s`; counts and ratings are kept (and every entry, in a list)."""

    skipped_lines = 0

    def __init__(self, client: Any, remember_s: int = REMEMBER_RESPONSES_S) -> None:
        import redis

        self.client = client
        self.remember_s = remember_s
        self.errors = redis.RedisError
        self.breaker = _Breaker("served responses not recorded (they cannot be rated)")

    def served(self, response_id: str, key: Key) -> None:
        if self.breaker.is_open():
            return
        member = json.dumps(key)
        try:
            with self.client.pipeline(transaction=False) as pipe:  # one round trip
                pipe.set(PREFIX + "feedback:response:" + response_id, member, ex=self.remember_s)
                pipe.hincrby(PREFIX + "feedback:served", member, 1)
                pipe.zadd(PREFIX + "feedback:seen", {member: time.time()}, nx=True)
                pipe.execute()
        except self.errors as error:  # the answer still goes out; only its rating is lost
            self.breaker.trip(error)

    def lookup(self, response_id: str) -> Key | None:
        raw = self.client.get(PREFIX + "feedback:response:" + response_id)
        return _key(raw) if raw is not None else None

    def add_rating(self, key: Key, entry: dict[str, Any]) -> None:
        member = json.dumps(key)
        with self.client.pipeline() as pipe:
            pipe.hincrby(PREFIX + "feedback:rated", member, 1)
            pipe.hincrby(PREFIX + "feedback:positive", member, int(entry["positive"]))
            pipe.zadd(PREFIX + "feedback:seen", {member: time.time()}, nx=True)
            pipe.rpush(PREFIX + "feedback:entries", json.dumps(entry))
            pipe.execute()

    def totals(self) -> tuple[list[Key], dict[Key, int], dict[Key, tuple[int, int]]]:
        with self.client.pipeline(transaction=True) as pipe:  # one consistent snapshot
            pipe.zrange(PREFIX + "feedback:seen", 0, -1)
            pipe.hgetall(PREFIX + "feedback:served")
            pipe.hgetall(PREFIX + "feedback:rated")
            pipe.hgetall(PREFIX + "feedback:positive")
            seen, served, rated, positive = pipe.execute()
        counts = {_key(member): (int(positive.get(member, 0)), int(total)) for member, total in rated.items()}
        return [_key(member) for member in seen], {_key(m): int(n) for m, n in served.items()}, counts


def _file(file_id: str, part: str) -> str:
    return f"{PREFIX}file:{file_id}:{part}"


def _job(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def _lease(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:lease"


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _key(raw: bytes | str) -> Key:
    model, variant = json.loads(raw)
    return model, variant


def _job_fields(job: dict[str, Any]) -> dict[str, str | int]:
    """A job (or changes to one) as hash fields: JSON per top-level field, request counts as integers."""
    fields: dict[str, str | int] = {}
    for name, value in job.items():
        if name == "request_counts":
            fields.update({f"request_counts.{counter}": int(value[counter]) for counter in COUNTERS})
        else:
            fields[name] = json.dumps(value)
    return fields


def _job_from(fields: dict[bytes, bytes]) -> Job | None:
    if not fields:
        return None
    job: Job = {}
    for raw_name, raw_value in fields.items():  # in the order saved: request_counts lands where it was
        name = raw_name.decode()
        if name.startswith("request_counts."):
            job.setdefault("request_counts", {})[name.removeprefix("request_counts.")] = int(raw_value)
        else:
            job[name] = json.loads(raw_value)
    return job
