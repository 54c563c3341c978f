"""The job worker: runs patch-training jobs from the arq queue (`fairpatch worker`).

One job (`train_patch`): load the dataset, split it (stratified by group x label, seeded) into a
fit part and a held-out part, fit the method through an `HttpOracle` on the real upstream within
the query budget, score the held-out part before and after the patch through a second, unbudgeted
`HttpOracle` (those queries are counted apart), store the patch bound to its model version, and
write the result into the job record. The fit and the evaluation are blocking numpy / HTTP code, so
they run in a thread (`asyncio.to_thread`) and the worker's event loop stays free for progress
writes, aborts and other jobs.

Every error ends the job as `failed` with a message saying what went wrong while doing what; the
worker itself carries on. An abort (DELETE /v1/jobs/{id}) cancels the job's task through arq and
sets a flag the fit thread checks before every upstream batch and progress report. A worker shut
down mid-job puts the job back to `queued`, and arq runs it again on the next worker (at most
`MAX_TRIES` times). A worker that dies without a word (SIGKILL, out of memory) is noticed by its
heartbeat: every running job beats (progress writes count, and a task on the event loop beats while
the fit thread runs); a job whose heartbeat is older than `job_heartbeat_timeout_s` is re-queued
once, then failed (`JobStore.expire_if_stale`, applied by every reader and by each worker's sweeper).
A Redis outage does not end the worker (`ResilientWorker`): it reconnects with backoff and takes jobs
again once Redis is back.

Processes: `fairpatch worker` (`main`) runs arq's `Worker` on the configured Redis or, with none
configured, on the embedded Redis that `fairpatch serve` runs under the same data directory;
`fairpatch serve` starts one itself in embedded mode (`spawn` / `stop`). `WorkerThread` runs one in
a background thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func

from service.datasets_store import DatasetStore
from service.jobs import (
    ACTIVE,
    ARTIFACT_ACCESS,
    REDIS_DOWN,
    TASK_NAME,
    JobRecord,
    JobStore,
    job_deserializer,
    job_serializer,
    plain,
)
from service.patch_store import PatchStore
from service.prometheus import JOB_QUERIES, JOBS
from service.redact import install as install_redaction
from service.redact import redact, redact_url
from service.registry import ModelRegistry, ModelSpec
from service.settings import Settings

log = logging.getLogger("fairpatch.worker")
_T = TypeVar("_T")

MAX_TRIES = 3  # runs of one job that a worker shutdown may interrupt before it fails for good
PROGRESS_EVERY_S = 0.25  # the fit's progress reaches the record at most this often
FIT_SHARE = 0.9  # fraction of the progress bar the fit takes; the evaluation takes the rest


class JobCancelled(Exception):
    """Raised inside the fit thread once the job has been cancelled (or the worker is stopping)."""


class JobFailed(Exception):
    """A job that cannot go on; the message is for the user."""


# ---------------------------------------------------------------- the job


def _cancellable(oracle: Any, cancelled: threading.Event, sent: Callable[[int], None] | None = None) -> Any:
    """Check the cancel flag before every batch the oracle sends, and report the rows of each batch to `sent`."""
    def before_batch(rows: int) -> None:
        if cancelled.is_set():
            raise JobCancelled("the job was cancelled")
        if sent is not None:
            sent(rows)

    oracle.before_batch = before_batch
    return oracle


def _describe(exc: BaseException) -> str:
    from pydantic import ValidationError

    from service.errors import ApiError
    from service.oip import describe_validation_errors

    if isinstance(exc, ValidationError):
        return f"invalid {exc.title}: {describe_validation_errors(exc.errors())}"
    if isinstance(exc, ApiError | JobFailed | ValueError | LookupError):  # messages written for users
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Progress:
    """The fit's `progress(fraction, info)` callback, and a count of the rows sent so far. Runs in the fit
    thread and writes through the worker's loop: on every new stage, else at most every PROGRESS_EVERY_S."""

    def __init__(self, jobs: JobStore, job_id: str, loop: asyncio.AbstractEventLoop,
                 cancelled: threading.Event) -> None:
        self.jobs, self.job_id, self.loop, self.cancelled = jobs, job_id, loop, cancelled
        self.queries_used = 0
        self._state: dict[str, Any] = {"fraction": 0.0, "stage": "fitting", "queries_used": 0}
        self._last = 0.0

    def __call__(self, fraction: float, info: dict | None = None) -> None:
        if self.cancelled.is_set():
            raise JobCancelled("the job was cancelled")
        info = dict(info or {})
        stage = str(info.pop("stage", self._state["stage"]))
        info.pop("queries_used", None)
        state = {"fraction": round(FIT_SHARE * min(max(float(fraction), 0.0), 1.0), 4), "stage": stage}
        state.update({k: v for k, v in plain(info).items() if isinstance(v, int | float | str | bool)})
        force = stage != self._state["stage"] or fraction >= 1.0
        self._state = state
        self._publish(force)

    def sent(self, rows: int) -> None:
        self.queries_used += rows
        self._publish(False)

    def _publish(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        progress = {**self._state, "queries_used": self.queries_used}
        if self.cancelled.is_set():
            return
        future = asyncio.run_coroutine_threadsafe(self.jobs.running_progress(self.job_id, progress), self.loop)
        try:
            future.result(timeout=5)
        except Exception as e:  # noqa: BLE001 - progress is best effort; the fit goes on
            log.warning("job %s: cannot write progress: %s", self.job_id, e)


def eval_sample(y: np.ndarray, groups: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Positions of at most `budget` held-out rows to score the patch on: every row when they fit, else a sample
    that keeps each (group, label) cell's share (so the upstream sees query_budget + eval_budget rows at most)."""
    from patcher.tuning import stratified_split

    if len(y) <= budget:
        return np.arange(len(y))
    if budget == 0:
        return np.arange(0)
    return stratified_split(y, groups, budget / len(y), [seed, 1])[0][:budget]


def _evaluate(spec: ModelSpec, patch: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
              cancelled: threading.Event, seed: int, group_names: tuple[str, ...] = (),
              criterion: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Headline metrics on the held-out rows before and after the patch (patcher.pipeline.score: the patch runs
    as the gateway runs it, randomized decisions drawn reproducibly from `seed`), through an unbudgeted oracle."""
    from patcher.apply import PatchRunner
    from patcher.group_figures import by_group
    from patcher.pipeline import score
    from service.http_oracle import HttpOracle

    with _cancellable(HttpOracle(spec), cancelled) as oracle:
        s = score(PatchRunner(patch, device), oracle.log_probs, X, y, groups, seed=seed)
        scores = {"before": s.before, "after": s.after, "eval_queries": oracle.queries_used,
                  "group_at_inference": s.group_at_inference, "served_by": s.served_by,
                  # per group, with bootstrap intervals: what the HTML report plots
                  "by_group": by_group(y, s.before_log_probs.argmax(1), s.after_decisions, groups,
                                       list(group_names), seed=seed)}
    scores["held_out"] = _held_out(y, s.before_log_probs.argmax(1), s.after_decisions, groups, criterion, seed,
                                   len(group_names) or None)
    return scores


def _held_out(y: np.ndarray, before: np.ndarray, after: np.ndarray, groups: np.ndarray, criterion: str | None,
              seed: int, n_groups: int | None = None) -> dict[str, Any] | None:
    """The activation guard's verdict (patcher.verdict) on the rows `_evaluate` scored; None without them."""
    from patcher.verdict import held_out_verdict

    if criterion is None or not len(y):
        return None
    n_groups = n_groups or int(np.max(groups)) + 1
    return held_out_verdict(y, before, after, groups, n_groups, criterion, seed=seed)


async def _model_artifact(ctx: dict[str, Any], spec: ModelSpec) -> Any:
    """The version's ONNX artifact for gradient / weight access, checked against the hash recorded at upload."""
    from patcher.access import ModelArtifact
    from service.artifacts import verified

    registry: ModelRegistry = ctx["registry"]
    data = await registry.artifact_bytes(spec.name, spec.version)
    try:
        return ModelArtifact(verified(data, spec.artifact, f"model {spec.name} version {spec.version}"), name=spec.name)
    except ValueError as e:
        raise JobFailed(str(e)) from None


async def _exemplar(ctx: dict[str, Any], job: JobRecord, group_names: tuple[str, ...], n_features: int) -> Any:
    from patcher.tuning import TuningData

    ex = await ctx["datasets"].load(job.exemplar_dataset, group_order=list(group_names))
    if ex.X.shape[1] != n_features:
        raise JobFailed(f"the exemplar dataset {job.exemplar_dataset} has {ex.X.shape[1]} feature columns, the "
                        f"training dataset {job.dataset} {n_features}")
    return TuningData(ex.X, ex.y, ex.groups, ex.group_names, ex.feature_names)


async def _run(ctx: dict[str, Any], job: JobRecord, cancelled: threading.Event, stage: list[str]) -> dict[str, Any]:
    from patcher.methods import FitRequest, get_method
    from patcher.tuning import TuningData, stratified_split
    from service.http_oracle import HttpOracle

    jobs: JobStore = ctx["jobs"]
    stage[0] = "loading the model and the dataset"
    spec = await ctx["registry"].get(job.model, job.version)
    if spec is None:
        raise JobFailed(f"model {job.model} version {job.version} is no longer registered")
    data = await ctx["datasets"].load(job.dataset, group_order=spec.groups)
    held_idx, fit_idx = stratified_split(data.y, data.groups, job.holdout, job.seed)
    if len(fit_idx) == 0 or (job.holdout > 0 and len(held_idx) == 0):
        raise JobFailed(f"holdout {job.holdout} of {len(data.y)} rows leaves one part empty; "
                        "upload more rows or change holdout")
    eval_idx = eval_sample(data.y[held_idx], data.groups[held_idx], job.eval_budget, job.seed)
    held_idx = held_idx[eval_idx]
    method = get_method(job.method)
    options = method.parse_options(job.options, job.preset)
    tune = TuningData(data.X[fit_idx], data.y[fit_idx], data.groups[fit_idx], data.group_names, data.feature_names)
    exemplar = None
    if job.exemplar_dataset is not None:
        exemplar = await _exemplar(ctx, job, data.group_names, data.X.shape[1])

    stage[0] = f"fitting {job.method}"
    progress = _Progress(jobs, job.id, asyncio.get_running_loop(), cancelled)
    if job.access in ARTIFACT_ACCESS:  # the ONNX file; the upstream sees no query while the method fits
        access: Any = await _model_artifact(ctx, spec)
        oracle = None
    else:
        access = oracle = _cancellable(await asyncio.to_thread(HttpOracle, spec, budget=job.query_budget),
                                       cancelled, progress.sent)

    device = ctx["settings"].device
    request = FitRequest(criterion=job.criterion, budget=job.query_budget, seed=job.seed, progress=progress,
                         output_kind=spec.upstream.output_kind, access=job.access, exemplar=exemplar, row_ids=fit_idx,
                         device=device)

    def fit() -> Any:
        try:
            return method.fit(access, tune, request, options)
        finally:  # in the thread: a cancelled job's client is closed when the thread is done with it
            if oracle is not None:
                oracle.close()

    result = await asyncio.to_thread(fit)
    patch, report = result.patch, result.report
    if cancelled.is_set():
        raise JobCancelled("the job was cancelled")
    if not hasattr(patch, "for_model"):
        raise JobFailed(f"method {job.method} returned {type(patch).__name__}, not a Patch")
    queries_used = 0 if oracle is None else oracle.queries_used
    JOB_QUERIES.labels(job.method).inc(queries_used)

    if len(held_idx):
        stage[0] = "scoring the held-out rows"
        await jobs.running_progress(job.id, {"fraction": FIT_SHARE, "stage": stage[0], "queries_used": queries_used})
        scores = await asyncio.to_thread(_evaluate, spec, patch, data.X[held_idx], data.y[held_idx],
                                         data.groups[held_idx], cancelled, job.seed, data.group_names,
                                         job.criterion, device)
    else:  # holdout 0 or eval_budget 0: nothing held out to score on, and the result says so
        from patcher.apply import PatchRunner

        runner = PatchRunner(patch, "cpu")  # read for what it needs, never run
        scores = {"before": None, "after": None, "by_group": None, "eval_queries": 0,
                  "group_at_inference": runner.needs_group,
                  "served_by": "patch" if runner.replaces_model else "upstream",
                  "note": "no held-out report: holdout 0 or eval_budget 0 left no row to score the patch on"}

    stage[0] = "storing the patch"
    if cancelled.is_set():
        raise JobCancelled("the job was cancelled")
    bound = patch.for_model(spec.name, spec.version)
    patch_id = await ctx["patches"].put(bound)
    report_dict = report.model_dump(mode="json") if hasattr(report, "model_dump") else dict(report)
    if "warning" in report_dict and report_dict["warning"] is None:  # a report says "warning" only to warn
        del report_dict["warning"]
    held_out = scores.get("held_out")
    if held_out is not None:  # the activation guard reads it (service.rollout); the report says it in words
        from patcher.verdict import warning

        await ctx["patches"].set_verdict(patch_id, held_out)
        if (said := warning(held_out)) is not None:  # after the method's own words, if it said any
            report_dict["warning"] = f"{report_dict['warning']}. {said}" if report_dict.get("warning") else said
    return plain({"patch_id": patch_id, "queries_used": queries_used, "eval_queries": scores["eval_queries"],
                  "fit_rows": int(len(fit_idx)), "holdout_rows": int(len(held_idx)),
                  "query_budget": job.query_budget, "eval_budget": job.eval_budget,
                  **({"note": scores["note"]} if "note" in scores else {}),
                  "groups": list(data.group_names), "group_at_inference": scores["group_at_inference"],
                  "access": job.access, "served_by": scores["served_by"],
                  "artifact_sha256": None if oracle is not None else access.sha256,
                  "before": scores["before"], "after": scores["after"], "by_group": scores["by_group"],
                  "held_out": held_out, "report": report_dict,
                  "drop_rows": {name: [int(i) for i in rows] for name, rows in result.drop_rows.items()}})


def worker_id() -> str:
    """Who runs a job, as its record names it: the host (the pod, on Kubernetes) and the process."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def train_patch(ctx: dict[str, Any], job_id: str) -> str:
    """The arq task. Never raises for a job's own failure: it is written into the record instead."""
    jobs: JobStore = ctx["jobs"]
    settings: Settings = ctx["settings"]
    try:
        job = await jobs.get(job_id)
    except LookupError:
        log.warning("job %s has no record; skipped", job_id)
        return "no record"
    if ctx.get("job_try", 1) > MAX_TRIES:
        await jobs.transition(job_id, "failed", ACTIVE, finished_at=time.time(),
                              error=f"the job was interrupted {MAX_TRIES} times (worker restarts); giving up")
        return "failed"
    started, before = await jobs.start(job_id, settings.job_heartbeat_timeout_s, started_at=time.time(),
                                       worker=worker_id(),
                                       progress={"fraction": 0.0, "stage": "starting", "queries_used": 0})
    if not started:
        return f"skipped ({before})"  # cancelled before a worker got to it
    JOBS.labels(job.method, "running").inc()

    cancelled = threading.Event()
    stage = ["starting"]
    task = asyncio.ensure_future(_run(ctx, job, cancelled, stage))
    beat = asyncio.ensure_future(_heartbeat(jobs, job_id, settings.job_heartbeat_timeout_s / 3, cancelled))
    try:
        outcome = await _outcome(jobs, job_id, task, cancelled, stage, settings)
    finally:
        beat.cancel()
        jobs.forget(job_id)
    if outcome in ("succeeded", "failed"):  # a cancel is counted where it is asked (service.management)
        JOBS.labels(job.method, outcome).inc()
    if outcome == "failed" and "failed_runs" in ctx:  # arq counts it as complete: ResilientWorker.run_job recounts
        ctx["failed_runs"].add(ctx.get("job_id", job_id))
    if await jobs.status(job_id) == "queued":
        # Taken from this worker as lost (it stalled past the heartbeat bound) and put back in the queue, so this
        # run's end was not written: leave the job in arq's queue too, or arq would drop it while the record
        # waits for a run.
        raise Retry()
    return outcome


async def _outcome(jobs: JobStore, job_id: str, task: asyncio.Future, cancelled: threading.Event,
                   stage: list[str], settings: Settings) -> str:
    """Wait for the run and write how it ended (retrying through a Redis outage: see `_persist`)."""
    try:
        done, _ = await asyncio.wait({task}, timeout=settings.job_timeout_s)
    except asyncio.CancelledError:  # an abort, or the worker is shutting down
        cancelled.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(_requeue_unless_cancelled(jobs, job_id)), 5)
        raise
    if not done:
        cancelled.set()
        task.cancel()
        error = f"the job ran past its time limit of {settings.job_timeout_s:g}s while {stage[0]}"
        await _persist(lambda: jobs.finish(job_id, "failed", finished_at=time.time(), error=error))
        return "failed"
    try:
        result = task.result()
    except JobCancelled:  # the record says cancelled already, or another run holds it now
        await _persist(lambda: jobs.finish(job_id, "cancelled", finished_at=time.time()))
        return "cancelled"
    except Exception as e:  # noqa: BLE001 - a failed job, not a failed worker
        log.info("job %s failed while %s: %r", job_id, stage[0], e)
        error = redact(f"{stage[0]}: {_describe(e)}")  # the record is read back by clients: no credentials in it
        await _persist(lambda: jobs.finish(job_id, "failed", finished_at=time.time(), error=error))
        return "failed"
    changed, now = await _persist(lambda: jobs.finish(
        job_id, "succeeded", finished_at=time.time(), result=result,
        progress={"fraction": 1.0, "stage": "done", "queries_used": result["queries_used"]}))
    return "succeeded" if changed else str(now)




async def _persist(write: Callable[[], Awaitable[_T]], max_wait_s: float = 300.0) -> _T:
    """A job's final write, retried with backoff while Redis does not answer (the heartbeat goes on meanwhile,
    so the job is not taken as lost); re-raises once Redis has been gone `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    delay = 0.1
    while True:
        try:
            return await write()
        except REDIS_DOWN:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _heartbeat(jobs: JobStore, job_id: str, every_s: float, cancelled: threading.Event) -> None:
    """Beat for the job while it runs; stop its fit when the record is no longer this run's (re-queued after
    this worker was taken as lost, or cancelled). A beat Redis does not take is retried soon."""
    wait_s = every_s
    while True:
        await asyncio.sleep(wait_s)
        try:
            ours = await jobs.beat(job_id)
        except REDIS_DOWN:  # beat again soon: the first beat after Redis is back must not wait a full period
            wait_s = min(every_s, RECONNECT_FIRST_S)
            continue
        wait_s = every_s
        if not ours and not cancelled.is_set():
            log.info("job %s is no longer this worker's (cancelled or re-queued); stopping it", job_id)
            cancelled.set()
            return


async def _requeue_unless_cancelled(jobs: JobStore, job_id: str) -> None:
    changed, _ = await jobs.finish(job_id, "queued", progress={
        "fraction": 0.0, "stage": "interrupted by a worker shutdown; waiting to run again", "queries_used": 0})
    if changed:
        log.info("job %s interrupted; it goes back to the queue", job_id)


# ---------------------------------------------------------------- the worker


def arq_redis(redis_url: str, queue: str) -> ArqRedis:
    pool = ArqRedis.from_url(redis_url, socket_connect_timeout=2, health_check_interval=30)
    pool.job_serializer, pool.job_deserializer = job_serializer, job_deserializer
    pool.default_queue_name = queue
    return pool


def worker_settings(settings: Settings, redis_url: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of arq's `Worker` for the jobs queue (arq's "WorkerSettings")."""

    async def startup(ctx: dict[str, Any]) -> None:
        redis = ctx["redis"]
        jobs = JobStore(redis)
        ctx.update(settings=settings, jobs=jobs, registry=ModelRegistry(redis),
                   datasets=DatasetStore(redis), patches=PatchStore(redis, device=settings.device))
        ctx["sweeper"] = asyncio.ensure_future(_sweep(jobs, settings.job_heartbeat_timeout_s))
        ctx["failed_runs"] = set()  # arq ids of runs that ended a job as failed (shared by every job's ctx)
        log.info("worker ready on queue %r", settings.job_queue)

    async def shutdown(ctx: dict[str, Any]) -> None:
        sweeper = ctx.pop("sweeper", None)
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    return {
        "functions": [func(train_patch, name=TASK_NAME, timeout=settings.job_timeout_s + 60,
                           max_tries=MAX_TRIES + 1)],
        "queue_name": settings.job_queue, "redis_pool": arq_redis(redis_url, settings.job_queue),
        "on_startup": startup, "on_shutdown": shutdown, "max_jobs": settings.worker_max_jobs,
        "allow_abort_jobs": True, "retry_jobs": True,
        "job_serializer": job_serializer, "job_deserializer": job_deserializer, "keep_result": 3600,
        "log_results": False, **overrides}


async def _sweep(jobs: JobStore, bound_s: float) -> None:
    """Every worker looks for running jobs whose worker stopped beating (re-queued once, then failed), so a
    lost job moves on even when no one reads its record."""
    while True:
        await asyncio.sleep(min(bound_s / 2, 10.0))
        try:
            for job_id in await jobs.stale_candidates(bound_s):
                status = await jobs.expire_if_stale(job_id)
                if status is not None:
                    log.warning("job %s: the worker running it stopped answering; the job is %s now", job_id,
                                status)
        except REDIS_DOWN:
            continue  # the poll loop logs the outage


RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 5.0


class _Outage:
    """One Redis outage as the worker sees it: logged when it starts and when it ends, not on every retry."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None
        self.delay = RECONNECT_FIRST_S
        self.new = False  # the last failure started an outage

    def lost(self, exc: BaseException) -> float:
        """Seconds to wait before the next try (doubling up to RECONNECT_MAX_S)."""
        self.new = self.since is None
        if self.new:
            self.since = time.monotonic()
            log.warning("lost Redis at %s (%s); reconnecting with backoff (up to %gs between tries); jobs "
                        "already running go on", self.where, redact(str(exc) or type(exc).__name__),
                        RECONNECT_MAX_S)
        delay, self.delay = self.delay, min(self.delay * 2, RECONNECT_MAX_S)
        return delay

    def back(self) -> None:
        if self.since is not None:
            log.warning("Redis at %s answers again after %.1fs; taking jobs again", self.where,
                        time.monotonic() - self.since)
            self.since, self.delay = None, RECONNECT_FIRST_S


class ResilientWorker(Worker):
    """arq's Worker, kept running through a Redis outage: arq's poll loop raises on the first connection
    error, which ends the worker; here that error waits (backoff) and the loop polls again once Redis is
    back. Jobs already running go on (their progress writes are best effort, their final write retries)."""

    def __init__(self, *args: Any, redis_label: str = "Redis", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage = _Outage(redis_label)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_DOWN as e:
            delay = self.outage.lost(e)
            if self.outage.new:  # drop every pooled connection now, or each would fail once more after Redis is back
                with contextlib.suppress(Exception):
                    await self.pool.connection_pool.disconnect()
            await asyncio.sleep(delay)
        else:
            self.outage.back()

    async def run_job(self, job_id: str, score: int) -> None:
        await super().run_job(job_id, score)
        # A failed job returns normally (its error is in the record), so arq counted it complete: count it failed,
        # or the shutdown log says "0 failed" after jobs failed.
        failed: set[str] = self.ctx.get("failed_runs", set())
        if job_id in failed:
            failed.discard(job_id)
            self.jobs_complete -= 1
            self.jobs_failed += 1

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # A job re-queued while its run here is still winding down (taken as lost after a stall) is left to
        # another worker, or to this one once that run has ended: arq would start it twice in one process.
        job_ids = [j for j in job_ids if j.decode() not in self.tasks]
        try:
            await super().start_jobs(job_ids)
        except REDIS_DOWN:
            # arq had counted the job it was taking and held a slot for it when Redis went: give both back,
            # or each outage would leave the worker one job fewer to run at once.
            self.job_counter -= 1
            self.sem.release()
            raise


def create_worker(settings: Settings, redis_url: str, *, burst: bool = False, handle_signals: bool = True,
                  poll_delay: float = 0.5) -> Worker:
    """arq's Worker for the jobs queue. Build it on the event loop (thread) that will run it."""
    return ResilientWorker(**worker_settings(settings, redis_url, burst=burst, handle_signals=handle_signals,
                                             poll_delay=poll_delay), redis_label=redact_url(redis_url))


class WorkerThread:
    """A worker on its own event loop in a background thread; `stop()` cancels what runs and joins it."""

    def __init__(self, settings: Settings, redis_url: str, *, poll_delay: float = 0.05) -> None:
        self.settings, self.redis_url, self.poll_delay = settings, redis_url, poll_delay
        self.worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.worker = create_worker(self.settings, self.redis_url, handle_signals=False,
                                        poll_delay=self.poll_delay)
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self.worker.async_run())
        except BaseException as e:  # noqa: BLE001 - reported by start()/stop()
            self._error = e
            self._ready.set()
        finally:
            if self.worker is not None:
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(self.worker.close())
                if self.worker._pool is not None:  # close() stopped early
                    loop.run_until_complete(self.worker._pool.aclose())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def start(self) -> WorkerThread:
        self._thread = threading.Thread(target=self._main, name="fairpatch-worker", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"the worker did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._thread is None:
            return
        loop, worker = self._loop, self.worker
        if loop is not None and worker is not None and not loop.is_closed():
            def cancel() -> None:
                worker.handle_sig(signal.SIGTERM)  # cancels running jobs (they go back to the queue)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(cancel)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- processes


def embedded_redis_url(data_dir: str | Path) -> str:
    """Where `fairpatch serve` runs its embedded Redis for this data directory: the socket named in the
    redis.conf it wrote (a long data-dir path moves the socket to a temp dir), else the default path."""
    from service.redis_embedded import EmbeddedRedis

    embedded = EmbeddedRedis(data_dir)
    conf = embedded.dir / "redis.conf"
    socket_path = embedded.socket_path
    if conf.exists():
        for line in conf.read_text().splitlines():
            if line.startswith("unixsocket "):
                value = line.split(" ", 1)[1].strip()
                if value.startswith('"') and value.endswith('"'):
                    value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                socket_path = value
    return f"unix://{socket_path}"


async def _wait_for_redis(url: str, wait_s: float) -> bool:
    from redis.asyncio import Redis

    deadline = time.monotonic() + wait_s
    while True:
        client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            if await client.ping():
                return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        finally:
            await client.aclose()
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


def main(settings: Settings, *, burst: bool = False, wait_s: float = 30.0) -> int:
    """`fairpatch worker`: run until SIGTERM / SIGINT (or, with `burst`, until the queue is empty)."""
    url = settings.redis_url or embedded_redis_url(settings.data_dir)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if not loop.run_until_complete(_wait_for_redis(url, wait_s)):
        where = "FAIRPATCH_REDIS_URL" if settings.redis_url else \
            f"the embedded Redis of {settings.data_dir} (start `fairpatch serve` first, or set FAIRPATCH_REDIS_URL)"
        print(f"fairpatch worker: no Redis answers at {redact_url(url)}: {where}", file=sys.stderr)
        loop.close()
        return 2
    worker = create_worker(settings, url, burst=burst)
    log.info("worker %d on %s, queue %r", os.getpid(), redact_url(url), settings.job_queue)
    worker.run()  # handles SIGTERM / SIGINT: running jobs are cancelled and go back to the queue
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
    return 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(redis_url: str, settings: Settings) -> subprocess.Popen:
    """One `fairpatch worker` subprocess on `redis_url` (the gateway's; embedded mode passes its socket)."""
    env = dict(os.environ)
    env["FAIRPATCH_REDIS_URL"] = redis_url
    env["FAIRPATCH_JOB_QUEUE"] = settings.job_queue
    env["FAIRPATCH_DATA_DIR"] = str(settings.data_dir)
    env["FAIRPATCH_JOB_HEARTBEAT_TIMEOUT_S"] = repr(settings.job_heartbeat_timeout_s)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    linux = sys.platform.startswith("linux")
    return subprocess.Popen([sys.executable, "-m", "service.worker"], env=env, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if linux else None)


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (arq cancels running jobs, which go back to the queue), SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("worker %d did not stop within %.0fs; killing it", process.pid, timeout)
        process.kill()
        process.wait()


if __name__ == "__main__":  # what `spawn` runs
    _settings = Settings()
    logging.basicConfig(level=_settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    install_redaction([_settings.admin_key.get_secret_value() if _settings.admin_key else None])
    sys.exit(main(_settings))
