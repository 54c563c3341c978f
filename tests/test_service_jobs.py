"""Patch-training jobs end to end, over real servers on loopback: the gateway (uvicorn in a thread), the
cached Adult reference model behind the local ONNX upstream, a real Redis (REDIS_URL, else embedded)
and an arq worker (in a thread here; as `fairpatch serve`'s own subprocess in the last test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from patcher.patch import Patch
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import EmbeddedRedis
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import MAX_TRIES, WorkerThread, embedded_redis_url, eval_sample
from tests import expected
from tests.processes import ready, served, until

REPO = Path(__file__).resolve().parents[1]
KEY = "jobs-admin-key"
RUN = uuid.uuid4().hex[:6]  # names of their own on a shared REDIS_URL
FINISHED = ("succeeded", "failed", "cancelled")


def slowed(app, delay_s: float):
    """The upstream, answering every infer request `delay_s` late."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            await asyncio.sleep(delay_s)
        await app(scope, receive, send)

    return wrapped


class CountingUpstream:
    """An ASGI wrapper around the upstream that counts the rows of every infer request it receives (read from
    the request's V2 header, as sent: an independent count, not the oracle's) and, while `gate` is clear,
    holds each request until the test sets it."""

    def __init__(self, app) -> None:
        self.app = app
        self.gate = threading.Event()
        self.gate.set()
        self.rows = self.requests = self.held = 0
        self.server: ServerThread | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        length = headers.get(b"inference-header-content-length")
        header = json.loads(body[:int(length)] if length is not None else body)
        self.rows += int(header["inputs"][0]["shape"][0])
        self.requests += 1
        self.held += 1
        while not self.gate.is_set():  # the server's own loop polls the test's gate
            await asyncio.sleep(0.01)
        self.held -= 1
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def connections(self) -> int:
        """Open client connections to this upstream (a closed oracle leaves none)."""
        return len(self.server._server.server_state.connections)


@pytest.fixture
def counting(adult_model):
    """A fresh counting upstream per test, on its own port."""
    upstream = CountingUpstream(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult")))
    with ServerThread(upstream) as server:
        upstream.server = server
        yield upstream
        upstream.gate.set()  # nothing stays held past the test


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                    job_queue=f"test-jobs:{RUN}")


@pytest.fixture(scope="module")
def upstreams(adult_model):
    model = OnnxModel(adult_model.onnx_bytes, name="adult")
    with ServerThread(create_upstream_app(model)) as fast, \
            ServerThread(slowed(create_upstream_app(model), 1.0)) as slow:
        yield {"fast": fast.url, "slow": slow.url}


@pytest.fixture(scope="module")
def client(settings, upstreams):
    with ServerThread(create_app(settings)) as server, WorkerThread(settings, settings.redis_url), \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def register(client, name: str, url: str, timeout_s: float = 10) -> None:
    spec = {"name": name, "version": "1", "groups": ["Female", "Male"],
            "upstream": {"url": url, "model_name": "adult", "input_name": "input", "output_name": "logits",
                         "output_kind": "logits", "timeout_s": timeout_s}}
    r = client.post("/v1/models", json=spec)
    assert r.status_code == 201, r.text


def adult_csv(adult, rows: slice = slice(None)) -> bytes:
    frame = pd.DataFrame(adult.tune.X[rows], columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
    frame["income"] = adult.tune.y[rows]
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[rows]]
    return frame.to_csv(index=False).encode()


@pytest.fixture(scope="module")
def model(client, upstreams) -> str:
    """The Adult reference model, registered once for the module."""
    name = f"adult-{RUN}"
    register(client, name, upstreams["fast"])
    return name


@pytest.fixture(scope="module")
def dataset(client, adult) -> str:
    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult),
                    headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit(client, model: str, dataset: str, budget: int = 800, **extra) -> dict:
    body = {"model": model, "method": "eraser", "dataset": dataset, "criterion": "dp", "query_budget": budget,
            "holdout": 0.3, "seed": 0, "options": {"bias": "group"}, **extra}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    record = r.json()
    assert r.headers["location"] == f"/v1/jobs/{record['id']}" and record["status"] == "queued"
    return record


def wait(client, job_id: str, until=lambda j: j["status"] in FINISHED, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if until(record):
            return record
        assert time.monotonic() < deadline, f"job stuck: {record}"
        time.sleep(0.05)


# --- jobs --------------------------------------------------------------------------------------------------

def assert_figures_are_fairlearns(result: dict, patch: Patch, adult, adult_model) -> None:
    """The job's before/after figures equal Fairlearn's and scikit-learn's, recomputed here from predictions on
    the same held-out rows: the model's ONNX file and the patch's own graph run directly (tests.expected)."""
    import onnxruntime as ort
    from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from patcher.tuning import stratified_split

    held, _ = stratified_split(adult.tune.y, adult.tune.groups, 0.3, 0)  # the job's split: holdout 0.3, seed 0
    held = held[eval_sample(adult.tune.y[held], adult.tune.groups[held], result["eval_budget"], 0)]  # its sample
    assert len(held) == result["holdout_rows"]
    X, y, g = adult.tune.X[held].astype(np.float32), adult.tune.y[held], adult.tune.groups[held]
    logits = ort.InferenceSession(adult_model.onnx_bytes, providers=["CPUExecutionProvider"]).run(
        None, {"input": X})[0]
    predictions = {"before": logits.argmax(1),
                   "after": expected.patched_log_probs(patch, X, logits, g, request_id="evaluation-0").argmax(1)}
    for when, pred in predictions.items():
        figures = result[when]
        want = {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
                "dp_diff": demographic_parity_difference(y, pred, sensitive_features=g),
                "eo_diff": equalized_odds_difference(y, pred, sensitive_features=g),
                # over the (group, label) cells, as the job defines it
                "worst_group_accuracy": MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred,
                                                    sensitive_features={"group": g, "label": y}).group_min()}
        for name, value in want.items():
            assert figures[name] == pytest.approx(value, abs=1e-9), (when, name, figures[name], value)

def test_a_job_learns_a_patch_that_lowers_dp_within_its_budget(client, counting, dataset, adult, adult_model):
    model = f"counted-{RUN}"
    register(client, model, counting.server.url)
    record = submit(client, model, dataset, budget=800, version=None)  # version: the latest
    assert record["version"] == "1" and record["progress"]["stage"] == "queued"
    done = wait(client, record["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert 0 < result["queries_used"] <= 800
    # the held-out part is 0.3 of the rows (2,715); the report scores a sample of the default eval_budget (2000)
    assert 0 < result["eval_queries"] <= 2000 and 1990 <= result["holdout_rows"] <= 2000
    assert result["fit_rows"] == pytest.approx(0.7 * 9049, abs=3) and result["eval_budget"] == 2000
    before, after = result["before"], result["after"]
    assert after["dp_diff"] < before["dp_diff"] - 0.05, (before, after)
    assert after["accuracy"] > before["accuracy"] - 0.05
    assert result["report"]["criterion"] == "dp" and result["report"]["queries_used"] == result["queries_used"]
    assert done["progress"] == {"fraction": 1.0, "stage": "done", "queries_used": result["queries_used"]}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] and done["error"] is None
    assert done["id"] in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    # the budget as the upstream counted it: every row it received was a fit query or an evaluation query
    assert counting.rows == result["queries_used"] + result["eval_queries"], (counting.rows, result)

    # the patch is stored for that model version, and can be served
    pid = result["patch_id"]
    patches = client.get(f"/v1/models/{model}/versions/1/patches").json()
    assert [p["id"] for p in patches["patches"]] == [pid] and patches["patches"][0]["group_at_inference"]
    assert client.post(f"/v1/models/{model}/versions/1/patches/{pid}/activate").status_code == 200
    patch = Patch.from_bytes(client.get(f"/v1/patches/{pid}").content, expected_id=pid)
    assert patch.manifest["model"] == {"name": model, "version": "1"} and patch.groups == ["Female", "Male"]
    assert_figures_are_fairlearns(result, patch, adult, adult_model)

    r = client.delete(f"/v1/jobs/{record['id']}")
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]


def test_a_job_against_a_down_upstream_fails_with_the_cause(client, dataset):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = f"down-{RUN}"
    register(client, model, f"http://127.0.0.1:{port}")
    done = wait(client, submit(client, model, dataset)["id"])
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"].startswith("fitting eraser: cannot reach upstream http://127.0.0.1:")
    assert client.get(f"/v1/models/{model}/versions/1/patches").json()["patches"] == []


def test_a_method_error_fails_the_job_and_the_worker_carries_on(client, model, dataset):
    done = wait(client, submit(client, model, dataset, budget=2)["id"])  # under Eraser's minimum
    assert done["status"] == "failed" and "too small" in done["error"]
    done = wait(client, submit(client, model, dataset, options={"bias": "proxies"})["id"])
    assert done["status"] == "failed" and "proxy_columns" in done["error"]
    done = wait(client, submit(client, model, dataset, options={"bias": "proxies", "proxy_columns": [500]})["id"])
    assert done["status"] == "failed" and "fitting eraser: index 500 is out of bounds" in done["error"]


@contextlib.contextmanager
def own_queue(settings: Settings, suffix: str, **overrides):
    """A gateway and a worker on a queue of their own (settings changed by `overrides`): (client, worker)."""
    other = settings.model_copy(update={"job_queue": f"{settings.job_queue}:{suffix}", **overrides})
    with ServerThread(create_app(other)) as server, WorkerThread(other, other.redis_url) as worker, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c, worker


def held_running(c, counting: CountingUpstream, model: str, dataset: str, budget: int = 500) -> dict:
    """A job submitted with the upstream's gate closed, once its first upstream request is held there."""
    counting.gate.clear()
    register(c, model, counting.server.url, timeout_s=120)  # the held request must not time out meanwhile
    record = submit(c, model, dataset, budget=budget)
    until(lambda: counting.held == 1, "the job's first upstream request")
    return record


def test_cancel_a_running_job_stops_its_upstream_calls(client, settings, counting, dataset):
    # a heartbeat far off: the cancel reaches the run through the abort alone
    with own_queue(settings, "cancel", job_heartbeat_timeout_s=600) as (c, worker):
        model = f"held-{RUN}"
        record = held_running(c, counting, model, dataset)
        running = c.get(f"/v1/jobs/{record['id']}").json()
        assert running["status"] == "running" and running["started_at"] is not None
        r = c.delete(f"/v1/jobs/{record['id']}")
        assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
        until(lambda: record["id"] not in worker.worker.job_tasks, "the worker to end the job's task")
        rows_at_cancel, requests_at_cancel = counting.rows, counting.requests
        assert requests_at_cancel == 1 and rows_at_cancel > 0
        counting.gate.set()  # the held request is answered; the fit must send nothing more and close its client
        until(lambda: counting.connections() == 0, "the fit to close its upstream client")
        assert (counting.rows, counting.requests) == (rows_at_cancel, requests_at_cancel)
        after = c.get(f"/v1/jobs/{record['id']}").json()
        assert after["status"] == "cancelled" and after["result"] is None and after["error"] is None
        assert c.get(f"/v1/models/{model}/versions/1/patches").json()["patches"] == []
        r = c.delete(f"/v1/jobs/{record['id']}")
        assert r.status_code == 409 and "already been cancelled" in r.json()["error"]


def test_a_job_past_its_time_limit_fails_with_the_reason(client, settings, counting, dataset):
    with own_queue(settings, "limit", job_timeout_s=3.0) as (c, _):
        model = f"limit-{RUN}"
        counting.gate.clear()  # every upstream request is held: the job cannot end in time
        register(c, model, counting.server.url, timeout_s=120)
        done = wait(c, submit(c, model, dataset, budget=500)["id"])
        assert done["status"] == "failed" and done["result"] is None
        # the stage it was in: fitting, unless a loaded machine kept it loading for the whole limit
        assert done["error"].startswith("the job ran past its time limit of 3s while "), done["error"]
        requests = counting.requests
        counting.gate.set()
        until(lambda: counting.connections() == 0, "the fit to close its upstream client")
        assert counting.requests == requests  # the fit stopped with the job
        assert c.get(f"/v1/models/{model}/versions/1/patches").json()["patches"] == []


def test_a_job_interrupted_max_tries_times_gives_up(client, settings, counting, dataset):
    other = settings.model_copy(update={"job_queue": f"{settings.job_queue}:tries"})
    model = f"tries-{RUN}"
    with ServerThread(create_app(other)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        counting.gate.clear()
        register(c, model, counting.server.url, timeout_s=120)
        record = submit(c, model, dataset, budget=500)
        for run in range(1, MAX_TRIES + 1):
            worker = WorkerThread(other, other.redis_url).start()
            until(lambda: counting.held == 1, f"run {run}'s first upstream request")
            stopping = threading.Thread(target=worker.stop)
            stopping.start()  # the shutdown puts the job back in the queue, then waits for the fit thread
            wait(c, record["id"], until=lambda j: j["status"] == "queued", timeout=60)
            counting.gate.set()
            stopping.join(60)
            assert not stopping.is_alive()
            counting.gate.clear()
        assert counting.requests == MAX_TRIES  # each run stopped after the request it had in flight
        with WorkerThread(other, other.redis_url):
            done = wait(c, record["id"])
        assert done["status"] == "failed" and done["result"] is None
        assert done["error"] == f"the job was interrupted {MAX_TRIES} times (worker restarts); giving up"
        assert counting.requests == MAX_TRIES  # the last try sent nothing


def test_a_queued_job_cancelled_never_runs(client, settings, model, dataset, adult):
    """A gateway on a queue no worker serves yet: jobs stay queued until one comes."""
    other = settings.model_copy(update={"job_queue": f"{settings.job_queue}:later"})
    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                    headers={"content-type": "text/csv"})
    doomed_dataset = r.json()["id"]
    with ServerThread(create_app(other)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        cancelled = submit(c, model, dataset)
        orphaned = submit(c, model, doomed_dataset)
        assert c.get(f"/v1/jobs/{cancelled['id']}").json()["status"] == "queued"
        r = c.delete(f"/v1/jobs/{cancelled['id']}")
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        assert c.delete(f"/v1/datasets/{doomed_dataset}").status_code == 204
        with WorkerThread(other, other.redis_url) as w:
            failed = wait(c, orphaned["id"])
            assert failed["status"] == "failed" and "no longer exists" in failed["error"]
            # both jobs left arq's queue: the cancelled one was taken and dropped, not run
            until(lambda: w.worker.jobs_complete + w.worker.jobs_failed >= 2, "the worker to take both jobs")
            assert c.get(f"/v1/jobs/{cancelled['id']}").json()["status"] == "cancelled"
            assert c.get(f"/v1/jobs/{cancelled['id']}").json()["started_at"] is None


def test_a_job_interrupted_by_a_worker_shutdown_runs_again_on_the_next_worker(client, settings, upstreams, adult):
    other = settings.model_copy(update={"job_queue": f"{settings.job_queue}:restart"})
    model = f"slow-restart-{RUN}"
    register(client, model, upstreams["slow"])
    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                    headers={"content-type": "text/csv"})
    with ServerThread(create_app(other)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        record = submit(c, model, r.json()["id"], budget=300)
        with WorkerThread(other, other.redis_url):
            wait(c, record["id"], until=lambda j: j["status"] == "running", timeout=30)
        interrupted = c.get(f"/v1/jobs/{record['id']}").json()
        assert interrupted["status"] == "queued" and "interrupted" in interrupted["progress"]["stage"]
        with WorkerThread(other, other.redis_url):
            done = wait(c, record["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["queries_used"] <= 300


# --- processes ---------------------------------------------------------------------------------------------

CLI = ("import sys, argparse; from service.commands import add_service_parsers; "
       "p = argparse.ArgumentParser(); add_service_parsers(p.add_subparsers()); "
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def worker_children(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            if "service.worker" in Path(f"/proc/{child}/cmdline").read_text() and alive(child):
                found.append(child)
        except FileNotFoundError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_worker_command_attaches_to_the_embedded_redis_of_its_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FAIRPATCH_REDIS_URL")}
    env.update(FAIRPATCH_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", CLI, "worker", "--burst", "--wait", "0.2"]
    p = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "start `fairpatch serve` first" in p.stderr  # it never starts a Redis itself
    with EmbeddedRedis(tmp_path):  # what `fairpatch serve` runs
        p = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr  # --burst: the queue is empty, so it is done


def test_embedded_redis_url_finds_a_socket_moved_to_a_temp_dir(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep) as url:
        assert embedded_redis_url(deep) == url and str(deep) not in url


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_serve_in_embedded_mode_runs_its_own_worker_and_stops_it(tmp_path, upstreams, adult):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FAIRPATCH_REDIS_URL")}
    env.update(FAIRPATCH_DATA_DIR=str(data_dir), FAIRPATCH_LOG_LEVEL="warning", FAIRPATCH_ADMIN_KEY=KEY,
               PYTHONPATH=str(REPO))
    with served([sys.executable, "-c", CLI, "serve", "--port", "0"], env=env, cwd=REPO,
                log_path=tmp_path / "serve.log", name="fairpatch serve", stop_timeout=30) as server:
        until(lambda: ready(server.url), "the gateway to be ready")
        worker_pids = worker_children(server.process.pid)
        assert len(worker_pids) == 1
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            register(c, "adult", upstreams["fast"])
            r = c.post("/v1/datasets", params={"label": "income", "group": "sex"},
                       content=adult_csv(adult, slice(3000)), headers={"content-type": "text/csv"})
            assert r.status_code == 201, r.text
            done = wait(c, submit(c, "adult", r.json()["id"], budget=300)["id"])
            assert done["status"] == "succeeded", done["error"]
            assert done["result"]["queries_used"] <= 300
        os.kill(worker_pids[0], signal.SIGKILL)  # a worker that dies is started again
        replacement = until(lambda: [p for p in worker_children(server.process.pid) if p != worker_pids[0]],
                            "a new worker")
        assert len(replacement) == 1
    assert server.returncode in (0, -signal.SIGTERM), server.log()
    assert not alive(worker_pids[0]) and not alive(replacement[0])
    assert not (data_dir / "redis" / "redis.sock").exists()
