"""Patch-training jobs: the request, the record clients poll, and the arq queue they travel on.

A job record is a Redis hash (prefix `fp:`): `job:{id}` -> {request: JSON, status, created_at,
started_at, finished_at, progress: JSON, result: JSON, error, and while a worker runs it: run (the
run's token), worker (host:pid), heartbeat_at (Redis clock), stale_after_s, stale_requeues}; `jobs` is a sorted set of
ids scored by creation time, `jobs:running` one of running ids scored by their last heartbeat.
Fields are written one by one, so the worker's progress writes never overwrite a status that the API
changed meanwhile; every status change goes through one Lua script that only moves from an allowed
status (a job cancelled while it finishes ends cancelled, and a finished job is never cancelled), and
a worker's writes only land while its run token is the record's (a run taken as lost writes nothing).

The queue is arq's, with JSON instead of pickle for job payloads: a job carries only its id, and
nothing a worker reads from Redis can run code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from typing import Any, Literal

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import Job, SerializationError
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from patcher.methods.contract import Access, Method
from service.registry import NAME_PATTERN

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
TASK_NAME = "train_patch"
ARTIFACT_ACCESS = frozenset({"gradient", "weights"})  # these need the version's uploaded ONNX artifact
# What a query-access job left without a budget may send the upstream: the SDK's and CLI's default, so a
# null or missing budget is never refused (the schema allows both).
DEFAULT_QUERY_BUDGET = 1000
# Held-out rows a job scores its patch on, at most (a sample of the held-out part): with the query budget, the
# bound on what one job sends the upstream.
DEFAULT_EVAL_BUDGET = 2000


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME_PATTERN, description="registered model name")
    version: str | None = Field(None, pattern=NAME_PATTERN, description="model version (default: the latest)")
    method: str = Field("eraser", description="a method (GET /v1/methods lists them)")
    dataset: str = Field(min_length=1, max_length=128, description="id of an uploaded dataset")
    criterion: Literal["dp", "eo", "eopp"] = "dp"
    query_budget: int | None = Field(None, gt=0, le=100_000_000,
                                     description="rows the fit may send to the upstream; null or missing: "
                                                 f"{DEFAULT_QUERY_BUDGET} for access queries and zeroth_order "
                                                 "(gradient and weights send none)")
    holdout: float = Field(0.3, ge=0, lt=1, description="fraction held out to score the patch on (0: no held-out "
                                                        "report; every row may be used to fit)")
    eval_budget: int | None = Field(None, ge=0, le=100_000_000,
                                    description="held-out rows sent to the upstream to score the patch before and "
                                                f"after (a sample of them); null or missing: {DEFAULT_EVAL_BUDGET}. "
                                                "The job sends the upstream at most query_budget + eval_budget rows")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    preset: str | None = Field(None, description="a named preset of the method's options (GET /v1/methods/{name} "
                                                 "lists them); `options` override it")
    options: dict[str, Any] = Field(default_factory=dict, description="method options (e.g. {'bias': 'group'}); "
                                    "GET /v1/methods/{name} gives each method's options schema")
    access: Access | None = Field(None, description="how the method reaches the model (default: the least "
                                                    "privileged kind the method supports)")
    exemplar_dataset: str | None = Field(None, min_length=1, max_length=128,
                                         description="id of a second uploaded dataset, for methods that take one "
                                                     "(FORML's exemplar set)")


class JobRecord(BaseModel):
    id: str
    status: Status
    method: str
    model: str
    version: str
    dataset: str
    criterion: str
    query_budget: int | None
    eval_budget: int = DEFAULT_EVAL_BUDGET
    holdout: float
    seed: int
    preset: str | None = None
    options: dict[str, Any]
    access: str = "queries"
    exemplar_dataset: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = Field(None, description="the running worker's last sign of life (Redis clock)")
    worker: str | None = Field(None, description="the worker that runs the job, or ran it last: host:pid")
    progress: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None


# ---------------------------------------------------------------- what a method accepts


class OptionInfo(BaseModel):
    name: str
    type: str
    default: Any
    description: str


class MethodInfo(BaseModel):
    """A method as the job API describes it (`GET /v1/methods/{name}`)."""

    name: str
    summary: str
    access: list[Access] = Field(description="access kinds it works with, least privileged first")
    default_access: Access
    criteria: list[Literal["dp", "eo", "eopp"]] = Field(description="the fairness criteria it can fit for")
    group_at_inference: Literal["required", "none", "optional"] = Field(
        description="whether its patches need the group with every request (optional: depends on the options)")
    takes_exemplar: bool = Field(description="whether a job may give it an exemplar_dataset")
    presets: dict[str, dict[str, Any]] = Field(description="named option sets a job selects with `preset`")
    options: list[OptionInfo]
    options_schema: dict[str, Any] = Field(description="JSON schema of `options`")

    @classmethod
    def of(cls, method: Method) -> MethodInfo:
        return cls.model_validate(plain(method.describe()))


# ---------------------------------------------------------------- JSON for the queue and the records


def _fallback(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return repr(obj)  # what arq stores as a failed job's "result": an exception


def job_serializer(obj: Any) -> bytes:
    return json.dumps(obj, default=_fallback).encode()


def job_deserializer(data: bytes) -> Any:
    return json.loads(data)


def plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN and infinities to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if getattr(obj, "ndim", 0) and hasattr(obj, "tolist"):  # numpy arrays (a method's per-row weights)
        return plain(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def arq_client(redis: Redis, queue: str) -> ArqRedis:
    """An arq client sharing `redis`'s connection pool (nothing new to open or close)."""
    return ArqRedis(pool_or_conn=redis.connection_pool, job_serializer=job_serializer,
                    job_deserializer=job_deserializer, default_queue_name=queue)


# ---------------------------------------------------------------- the store

# Every status change. KEYS: the record, the set of running jobs (id -> last heartbeat). ARGV: the new status,
# the allowed ones (comma-separated), the run token the record must hold ('' = any), the job id, then
# field / value pairs. Entering `running` stamps a heartbeat in Redis's own clock (no skew between machines).
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then ok = true end
end
if ok and ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[3] then ok = false end
if not ok then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] == 'running' then
  local t = redis.call('TIME')
  local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'heartbeat_at', now)
  redis.call('ZADD', KEYS[2], now, ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
return {1, cur}
"""

# A running job's heartbeat (and fields, e.g. progress), only from the run that holds the record.
# KEYS: the record, the running set. ARGV: the run token, the job id, then field / value pairs.
_BEAT = """
local h = redis.call('HMGET', KEYS[1], 'status', 'run')
if h[1] ~= 'running' or h[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'heartbeat_at', now)
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return 1
"""

# A running job whose heartbeat is older than the bound its worker recorded: back to the queue the first
# time (dropping arq's in-progress mark, so any live worker takes it now rather than in an hour), failed
# after that or when arq's queue no longer holds the job. Compare-and-set on the heartbeat the caller read,
# which the messages quote. KEYS: the record, the running set, arq's in-progress key, arq's job key.
# ARGV: the heartbeat read, the job id, the re-queue limit, the queued progress (JSON), the error when the
# limit is reached, the error when the queue lost the job.
_EXPIRE = """
local h = redis.call('HMGET', KEYS[1], 'status', 'heartbeat_at', 'stale_after_s', 'stale_requeues')
if h[1] ~= 'running' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return {0, h[1] or ''}
end
if not h[2] or not h[3] or h[2] ~= ARGV[1] then return {0, 'running'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if now - tonumber(h[2]) <= tonumber(h[3]) then return {0, 'running'} end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
local requeues = tonumber(h[4] or '0')
if requeues < tonumber(ARGV[3]) and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'stale_requeues', tostring(requeues + 1), 'progress', ARGV[4])
  return {1, 'queued'}
end
local finished = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local err = ARGV[5]
if requeues < tonumber(ARGV[3]) then err = ARGV[6] end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', finished, 'error', err)
return {1, 'failed'}
"""

STALE_REQUEUES = 1  # times a job whose worker stopped answering goes back to the queue before it fails
ARQ_IN_PROGRESS = in_progress_key_prefix  # the mark of a job a worker has taken
ARQ_JOB = job_key_prefix  # the queued job's payload (gone once arq has finished the job)
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)  # what an outage raises


class JobNotFound(LookupError):
    pass


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


class JobStore:
    """Job records. A worker process keeps the run token of each job it runs (`start`): its heartbeats,
    progress and final status are refused once the record belongs to another run (re-queued after this
    worker was taken as lost, or cancelled). Reading a running job whose heartbeat is stale moves it on
    (`expire_if_stale`), so a record never shows a frozen `running`, even with no worker alive."""

    def __init__(self, redis: Redis, prefix: str = "fp:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._transition = redis.register_script(_TRANSITION)
        self._beat = redis.register_script(_BEAT)
        self._expire = redis.register_script(_EXPIRE)
        self._runs: dict[str, str] = {}  # job id -> run token, for the jobs this process runs

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def _running_key(self) -> str:
        return f"{self.prefix}jobs:running"

    async def running_count(self) -> int:
        """Jobs a worker is running now (for the metrics)."""
        return int(await self.redis.zcard(self._running_key))

    async def create(self, request: JobRequest) -> JobRecord:
        """A new queued record for a request whose version is resolved (enqueue it next)."""
        job_id = uuid.uuid4().hex
        now = time.time()
        fields = {"request": request.model_dump_json(), "status": "queued", "created_at": repr(now),
                  "progress": json.dumps({"fraction": 0.0, "stage": "queued", "queries_used": 0})}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id), mapping=fields)
            pipe.zadd(f"{self.prefix}jobs", {job_id: now})
            await pipe.execute()
        return await self.get(job_id)

    async def get(self, job_id: str) -> JobRecord:
        raw = await self.redis.hgetall(self._key(job_id))
        if not raw:
            raise JobNotFound(f"unknown job {job_id!r}")
        h = {k.decode(): v.decode() for k, v in raw.items()}
        if h.get("status") == "running" and await self._expire_stale(job_id, h):
            return await self.get(job_id)
        return _record(job_id, h)

    async def list(self, limit: int = 50) -> list[JobRecord]:
        ids = [i.decode() for i in await self.redis.zrevrange(f"{self.prefix}jobs", 0, limit - 1)]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(self._key(i))
            raws = await pipe.execute()
        records = []
        for i, r in zip(ids, raws, strict=True):
            if not r:
                continue
            h = {k.decode(): v.decode() for k, v in r.items()}
            if h.get("status") == "running" and await self._expire_stale(i, h):
                records.append(await self.get(i))
            else:
                records.append(_record(i, h))
        return records

    async def transition(self, job_id: str, to: str, allowed: frozenset[str] | set[str], *, run_token: str = "",
                         **fields: Any) -> tuple[bool, str | None]:
        """Set the status to `to` (and `fields`) only if it is now one of `allowed` (and, given `run_token`, the
        record belongs to that run). Returns (changed, the status before); the status is None for an unknown
        job."""
        args: list[str] = [to, ",".join(sorted(allowed)), run_token, job_id]
        for name, value in fields.items():
            args += [name, _field(value)]
        changed, before = await self._transition(keys=[self._key(job_id), self._running_key], args=args)
        before = before.decode() if isinstance(before, bytes) else before
        return changed == 1, (None if changed == -1 else before)

    # -- the worker's side

    async def start(self, job_id: str, stale_after_s: float, **fields: Any) -> tuple[bool, str | None]:
        """Mark the job running under a new run token that this process keeps; `stale_after_s` is the
        heartbeat bound this worker promises to keep (it beats every third of it)."""
        token = uuid.uuid4().hex
        changed, before = await self.transition(job_id, "running", ACTIVE, **fields, run=token,
                                                stale_after_s=float(stale_after_s))
        if changed:
            self._runs[job_id] = token
        return changed, before

    async def finish(self, job_id: str, to: str, **fields: Any) -> tuple[bool, str | None]:
        """This process's run of the job ends (`to`: succeeded, failed, cancelled, or queued again); refused
        when the record no longer belongs to the run."""
        token = self._runs.get(job_id)
        if token is None:  # no run of this process: an empty token would let it end another worker's run
            return False, await self.status(job_id)
        changed, before = await self.transition(job_id, to, {"running"}, run_token=token, **fields)
        if changed or before != "running":
            self._runs.pop(job_id, None)
        return changed, before

    def forget(self, job_id: str) -> None:
        self._runs.pop(job_id, None)

    async def beat(self, job_id: str, **fields: Any) -> bool:
        """A heartbeat from this process's run of the job (with `fields`, e.g. progress); False when the
        record no longer belongs to the run. Raises the Redis error when Redis does not answer."""
        token = self._runs.get(job_id)
        if token is None:
            return False
        args: list[str] = [token, job_id]
        for name, value in fields.items():
            args += [name, _field(value)]
        return await self._beat(keys=[self._key(job_id), self._running_key], args=args) == 1

    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        await self.redis.hset(self._key(job_id), "progress", _field(progress))

    async def running_progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        """The worker's progress write, which is also a heartbeat: only while this process's run holds the
        job (a late write from a fit that was cancelled or re-queued must not overwrite what came after).
        Best effort: False, not an error, when Redis does not answer (the worker logs the outage)."""
        try:
            return await self.beat(job_id, progress=progress)
        except REDIS_DOWN:
            return False

    async def status(self, job_id: str) -> str | None:
        raw = await self.redis.hget(self._key(job_id), "status")
        return None if raw is None else raw.decode()

    # -- lost workers

    async def expire_if_stale(self, job_id: str) -> str | None:
        """Move a running job whose heartbeat is past its bound on (queued or failed); the new status, or
        None when nothing changed."""
        raw = await self.redis.hgetall(self._key(job_id))
        h = {k.decode(): v.decode() for k, v in raw.items()}
        if h.get("status") != "running":
            if raw:
                await self.redis.zrem(self._running_key, job_id)
            return None
        return await self._expire_stale(job_id, h)

    async def stale_candidates(self, older_than_s: float) -> list[str]:
        """Running jobs whose last heartbeat (Redis clock) is older than `older_than_s`."""
        sec, usec = await self.redis.time()
        ids = await self.redis.zrangebyscore(self._running_key, "-inf", sec + usec / 1e6 - older_than_s)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def _expire_stale(self, job_id: str, h: dict[str, str]) -> str | None:
        beat, bound = h.get("heartbeat_at"), h.get("stale_after_s")
        if not beat or not bound:
            return None  # a record written by a worker that kept no heartbeat
        lost = f"the worker running it stopped answering at {_when(float(beat))} (no heartbeat for {float(bound):g} s)"
        queued = {"fraction": 0.0, "stage": f"{lost}; waiting for another worker", "queries_used": 0}
        changed, status = await self._expire(
            keys=[self._key(job_id), self._running_key, ARQ_IN_PROGRESS + job_id, ARQ_JOB + job_id],
            args=[beat, job_id, STALE_REQUEUES, _field(queued),
                  f"{lost}, and it had been re-queued once already; submit it again with POST /v1/jobs",
                  f"{lost}, and the queue no longer holds it; submit it again with POST /v1/jobs"])
        return (status.decode() if isinstance(status, bytes) else status) if changed == 1 else None


def _field(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(plain(value), allow_nan=False)


def _record(job_id: str, h: dict[str, str]) -> JobRecord:
    req = json.loads(h["request"])
    num = lambda k: float(h[k]) if h.get(k) else None  # noqa: E731
    return JobRecord(
        id=job_id, status=h["status"], method=req["method"], model=req["model"], version=req["version"],
        dataset=req["dataset"], criterion=req["criterion"], query_budget=req["query_budget"],
        eval_budget=DEFAULT_EVAL_BUDGET if req.get("eval_budget") is None else req["eval_budget"],
        holdout=req["holdout"], seed=req["seed"], preset=req.get("preset"), options=req.get("options") or {},
        access=req.get("access") or "queries", exemplar_dataset=req.get("exemplar_dataset"),
        created_at=num("created_at") or 0.0, started_at=num("started_at"), finished_at=num("finished_at"),
        heartbeat_at=num("heartbeat_at"), worker=h.get("worker") or None,
        progress=json.loads(h["progress"]) if h.get("progress") else {},
        result=json.loads(h["result"]) if h.get("result") else None, error=h.get("error") or None)


# ---------------------------------------------------------------- the queue


async def enqueue(arq: ArqRedis, job_id: str) -> None:
    job = await arq.enqueue_job(TASK_NAME, job_id, _job_id=job_id)
    if job is None:  # arq refuses a job id it already holds; ours are fresh uuids
        raise RuntimeError(f"the queue already holds a job {job_id}")


async def abort(arq: ArqRedis, job_id: str, wait_s: float = 0.0) -> None:
    """Ask the worker running (or about to run) this job to cancel it. Does not wait for it by default:
    the record is already marked cancelled, and the worker stops the fit at its next checkpoint."""
    job = Job(job_id, redis=arq, _queue_name=arq.default_queue_name, _deserializer=job_deserializer)
    # A result already there (the job ended meanwhile) is stored as JSON, which arq reports as a SerializationError.
    with contextlib.suppress(asyncio.TimeoutError, SerializationError):
        await job.abort(timeout=wait_s, poll_delay=0.05)
