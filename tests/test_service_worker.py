"""The job worker's edge paths, on a real Redis (REDIS_URL, else embedded) and a real arq worker in a thread:
a task whose job record is gone, a model deregistered and a dataset too small by the time the job runs, a
worker that cannot start, and stopping a worker subprocess that ignores SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest

from service.app import create_app
from service.jobs import ACTIVE, TASK_NAME, JobRequest, JobStore
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread, arq_redis, stop
from tests.processes import until

KEY = "worker-admin-key"
RUN = uuid.uuid4().hex[:6]
FINISHED = ("succeeded", "failed", "cancelled")


def settings_for(redis_url: str, tmp_path, queue: str) -> Settings:
    return Settings(data_dir=tmp_path, redis_url=redis_url, admin_key=KEY, job_queue=f"test-worker:{RUN}:{queue}")


def test_a_task_whose_job_record_is_gone_is_skipped(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, "orphan")

    async def enqueue_and_wait() -> str:
        pool = arq_redis(redis_url, settings.job_queue)
        try:
            job = await pool.enqueue_job(TASK_NAME, f"gone-{RUN}", _job_id=f"gone-{RUN}")
            return await job.result(timeout=120, poll_delay=0.05)
        finally:
            await pool.aclose()

    with WorkerThread(settings, redis_url):
        assert asyncio.run(enqueue_and_wait()) == "no record"


def frame(rows: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 3)), columns=["a", "b", "c"])
    df["y"] = np.arange(rows) % 2
    df["g"] = ["p" if i % 4 < 2 else "q" for i in range(rows)]
    return df.to_csv(index=False).encode()


def test_jobs_whose_model_or_rows_are_gone_by_the_time_they_run_fail_with_the_reason(redis_url, tmp_path):
    """Submitted while no worker runs; then the model is deregistered (one job) and the other job's dataset
    has one row per (group, label) cell, so a 0.3 holdout leaves the held-out part empty."""
    settings = settings_for(redis_url, tmp_path, "gone")
    with ServerThread(create_app(settings)) as gw, \
            httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        ids = {}
        for name, rows in (("deregistered", 40), ("tiny", 4)):
            model = f"{name}-{RUN}"
            spec = {"name": model, "version": "1", "groups": ["p", "q"],
                    "upstream": {"url": "http://127.0.0.1:9", "model_name": "m", "output_name": "logits"}}
            assert c.post("/v1/models", json=spec).status_code == 201
            r = c.post("/v1/datasets", params={"label": "y", "group": "g"}, content=frame(rows),
                       headers={"content-type": "text/csv"})
            assert r.status_code == 201, r.text
            r = c.post("/v1/jobs", json={"model": model, "method": "eraser", "dataset": r.json()["id"],
                                         "criterion": "dp", "query_budget": 100, "holdout": 0.3, "seed": 0})
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]
        assert c.delete(f"/v1/models/deregistered-{RUN}/versions/1").status_code == 204
        with WorkerThread(settings, redis_url):
            done = {name: until(lambda i=i: (j := c.get(f"/v1/jobs/{i}").json())["status"] in FINISHED and j,
                                f"job {name} to end") for name, i in ids.items()}
    assert done["deregistered"]["status"] == "failed", done
    assert f"model deregistered-{RUN} version 1 is no longer registered" in done["deregistered"]["error"]
    assert done["tiny"]["status"] == "failed", done
    assert "holdout 0.3 of 4 rows leaves one part empty" in done["tiny"]["error"]


def test_a_job_cancelled_after_its_task_was_queued_is_skipped_by_the_worker(redis_url, tmp_path):
    """The record says cancelled but the task is still in arq's queue (the cancel raced the worker taking it):
    the worker does not run it."""
    settings = settings_for(redis_url, tmp_path, "raced")

    async def queue_cancel_and_wait() -> tuple[str, str]:
        pool = arq_redis(redis_url, settings.job_queue)
        jobs = JobStore(pool)
        try:
            record = await jobs.create(JobRequest(model="m", version="1", dataset="d" * 32))
            await jobs.transition(record.id, "cancelled", ACTIVE)  # what DELETE /v1/jobs/{id} writes, minus arq's abort
            job = await pool.enqueue_job(TASK_NAME, record.id, _job_id=record.id)
            return await job.result(timeout=120, poll_delay=0.05), await jobs.status(record.id)
        finally:
            await pool.aclose()

    with WorkerThread(settings, redis_url):
        assert asyncio.run(queue_cancel_and_wait()) == ("skipped (cancelled)", "cancelled")


def test_a_worker_that_cannot_start_says_why(tmp_path):
    worker = WorkerThread(Settings(data_dir=tmp_path), "nosuchscheme://nowhere")
    with pytest.raises(RuntimeError, match="the worker did not start"):
        worker.start()
    WorkerThread(Settings(data_dir=tmp_path), "redis://127.0.0.1:9").stop()  # never started: nothing to stop


def test_stopping_a_worker_process_kills_it_when_it_ignores_sigterm():
    code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); signal.pause()"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        stop(process, timeout=0.5)
        assert process.returncode == -signal.SIGKILL
        stop(process)  # already gone: nothing to do
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
