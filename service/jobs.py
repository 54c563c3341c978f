"""Patch-training jobs: the request, the record clients poll, and the arq queue they travel on.

A job record is a Redis hash (prefix `fp:`): `job:{id}` -> {request: JSON, status, created_at,
started_at, finished_at, progress: JSON, result: JSON, error}, and `jobs` is a sorted set of ids
scored by creation time. Fields are written one by one, so the worker's progress writes never
overwrite a status that the API changed meanwhile; every status change goes through one Lua script
that only moves from an allowed status (a job cancelled while it finishes ends cancelled, and a
finished job is never cancelled).

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
from arq.jobs import Job, SerializationError
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from patcher.methods.contract import Access, Method
from service.registry import NAME_PATTERN

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
TASK_NAME = "train_patch"
ARTIFACT_ACCESS = frozenset({"gradient", "weights"})  # these need the version's uploaded ONNX artifact


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME_PATTERN, description="registered model name")
    version: str | None = Field(None, pattern=NAME_PATTERN, description="model version (default: the latest)")
    method: str = Field("eraser", description="a method (GET /v1/methods lists them)")
    dataset: str = Field(min_length=1, max_length=128, description="id of an uploaded dataset")
    criterion: Literal["dp", "eo", "eopp"] = "dp"
    query_budget: int | None = Field(None, gt=0, le=100_000_000,
                                     description="rows the fit may send to the upstream (required for access "
                                                 "queries and zeroth_order; gradient and weights send none)")
    holdout: float = Field(0.3, gt=0, lt=1, description="fraction held out to score the patch on")
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
    holdout: float
    seed: int
    preset: str | None = None
    options: dict[str, Any]
    access: str = "queries"
    exemplar_dataset: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
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

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then ok = true end
end
if not ok then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {1, cur}
"""


class JobNotFound(LookupError):
    pass


class JobStore:
    def __init__(self, redis: Redis, prefix: str = "fp:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._transition = redis.register_script(_TRANSITION)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

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
        return _record(job_id, {k.decode(): v.decode() for k, v in raw.items()})

    async def list(self, limit: int = 50) -> list[JobRecord]:
        ids = [i.decode() for i in await self.redis.zrevrange(f"{self.prefix}jobs", 0, limit - 1)]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(self._key(i))
            raws = await pipe.execute()
        return [_record(i, {k.decode(): v.decode() for k, v in r.items()}) for i, r in zip(ids, raws, strict=True)
                if r]

    async def transition(self, job_id: str, to: str, allowed: frozenset[str] | set[str],
                         **fields: Any) -> tuple[bool, str | None]:
        """Set the status to `to` (and `fields`) only if it is now one of `allowed`.
        Returns (changed, the status before); the status is None for an unknown job."""
        args: list[str] = [to, ",".join(sorted(allowed))]
        for name, value in fields.items():
            args += [name, _field(value)]
        changed, before = await self._transition(keys=[self._key(job_id)], args=args)
        before = before.decode() if isinstance(before, bytes) else before
        return changed == 1, (None if changed == -1 else before)

    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        await self.redis.hset(self._key(job_id), "progress", _field(progress))

    async def running_progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        """The worker's progress write: only while the job is running (a late write from a fit that was
        cancelled or interrupted must not overwrite what the cancel or the requeue wrote)."""
        changed, _ = await self.transition(job_id, "running", {"running"}, progress=progress)
        return changed

    async def status(self, job_id: str) -> str | None:
        raw = await self.redis.hget(self._key(job_id), "status")
        return None if raw is None else raw.decode()


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
        holdout=req["holdout"], seed=req["seed"], preset=req.get("preset"), options=req.get("options") or {},
        access=req.get("access") or "queries", exemplar_dataset=req.get("exemplar_dataset"),
        created_at=num("created_at") or 0.0, started_at=num("started_at"), finished_at=num("finished_at"),
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
