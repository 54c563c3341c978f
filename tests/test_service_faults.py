"""Faults, caused for real: a `fairpatch worker` process SIGKILLed mid-job, Redis killed and restarted under a
worker, a password in the Redis URL. Real processes on loopback: the gateway (uvicorn in a thread, or
`fairpatch serve`), `fairpatch worker` subprocesses, the local ONNX upstream, redis-server.

"Mid-job" is made deterministic with a gated upstream: it holds every infer request until the test opens
the gate, so the test knows the fit is waiting on the upstream when it kills the worker. Every wait is on a
condition with a generous timeout; nothing asserts a duration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import EmbeddedRedis, redis_server_binary
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread
from tests.processes import listening_port, served, until
from tests.test_service_jobs import (
    CLI,
    adult_csv,
    alive,
    children,
    register,
    submit,
    wait,
    worker_children,
)

REPO = Path(__file__).resolve().parents[1]
KEY = "faults-admin-key-0f3c"
RUN = uuid.uuid4().hex[:6]


class Gate:
    """An upstream wrapper that holds infer requests while closed, and counts the ones that arrived."""

    def __init__(self, app) -> None:
        self.app = app
        self.opened = threading.Event()
        self._lock = threading.Lock()
        self.arrived = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            with self._lock:
                self.arrived += 1
            while not self.opened.is_set():
                await asyncio.sleep(0.01)
        await self.app(scope, receive, send)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FAIRPATCH_REDIS_URL")
           and not k.startswith("FAIRPATCH_")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


class WorkerProcess:
    """A `fairpatch worker` subprocess; its log goes to a file the test reads."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-c", CLI, "worker"], cwd=REPO, env=clean_env(**env),
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextlib.contextmanager
def worker_process(log_path: Path, **env: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(log_path, **env)
    try:
        yield w
    finally:
        w.stop()


# ---------------------------------------------------------------- a worker killed mid-job


@pytest.fixture(scope="module")
def gated(adult_model):
    gate = Gate(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult")))
    with ServerThread(gate) as server:
        gate.url = server.url
        yield gate
        gate.opened.set()  # let held requests finish so the server can stop


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                    job_queue=f"test-faults:{RUN}")


@pytest.fixture(scope="module")
def client(settings):
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client, adult) -> str:
    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                    headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def worker_env(settings: Settings, heartbeat_s: float) -> dict[str, str]:
    """A worker's environment. The heartbeat bound of a worker the test kills is a few seconds: short enough to
    wait for, long enough that a live worker on a loaded machine is never taken as lost."""
    return {"FAIRPATCH_REDIS_URL": settings.redis_url, "FAIRPATCH_JOB_QUEUE": settings.job_queue,
            "FAIRPATCH_JOB_HEARTBEAT_TIMEOUT_S": str(heartbeat_s), "FAIRPATCH_DATA_DIR": str(settings.data_dir)}


def kill_mid_fit(client, gate: Gate, job_id: str, log_path: Path, env: dict[str, str]) -> float:
    """Run the job on a fresh worker process and SIGKILL it while its fit waits on the (closed) gate; the
    time.monotonic() of the kill."""
    seen = gate.arrived
    with worker_process(log_path, **env) as w:
        until(lambda: gate.arrived > seen, "the fit's first upstream request")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        w.kill()
        return time.monotonic()


def test_a_job_whose_worker_is_killed_goes_back_to_the_queue_and_succeeds_on_the_next(client, settings, gated,
                                                                                    dataset, tmp_path):
    model = f"gated-{RUN}"
    register(client, model, gated.url)
    gated.opened.clear()
    job = submit(client, model, dataset, budget=300)
    killed_at = kill_mid_fit(client, gated, job["id"], tmp_path / "w1.log", worker_env(settings, 5.0))

    # No worker is alive: reading the job is what notices its worker is gone.
    requeued = wait(client, job["id"], until=lambda j: j["status"] != "running")
    print(f"\nworker SIGKILLed mid-job: the job read as {requeued['status']} {time.monotonic() - killed_at:.2f} s "
          "after the kill (heartbeat bound 5 s)")
    assert requeued["status"] == "queued", requeued
    assert requeued["progress"]["stage"].startswith("the worker running it stopped answering at ")
    assert requeued["result"] is None and requeued["error"] is None
    assert client.get(f"/v1/models/{model}/versions/1/patches").json()["patches"] == []  # nothing partial

    gated.opened.set()
    with worker_process(tmp_path / "w2.log", **worker_env(settings, 30.0)) as w2:
        done = wait(client, job["id"])
        assert done["status"] == "succeeded", (done, w2.log())
    assert done["result"]["queries_used"] <= 300
    patches = client.get(f"/v1/models/{model}/versions/1/patches").json()["patches"]
    assert [p["id"] for p in patches] == [done["result"]["patch_id"]]


def test_a_job_whose_worker_is_lost_twice_fails_with_the_reason(client, settings, gated, dataset, tmp_path):
    model = f"gated-twice-{RUN}"
    register(client, model, gated.url)
    gated.opened.clear()
    job = submit(client, model, dataset, budget=300)
    env = worker_env(settings, 5.0)
    kill_mid_fit(client, gated, job["id"], tmp_path / "w1.log", env)
    # the next worker's sweeper puts the job back in the queue, then takes it: killed mid-fit again
    killed_at = kill_mid_fit(client, gated, job["id"], tmp_path / "w2.log", env)

    failed = wait(client, job["id"])
    print(f"\nworker SIGKILLed mid-job a second time: the job read as {failed['status']} "
          f"{time.monotonic() - killed_at:.2f} s after the kill (heartbeat bound 5 s)")
    assert failed["status"] == "failed", failed
    assert failed["error"].startswith("the worker running it stopped answering at ")
    assert "re-queued once already" in failed["error"] and failed["result"] is None
    assert failed["finished_at"] is not None
    assert client.get(f"/v1/models/{model}/versions/1/patches").json()["patches"] == []
    gated.opened.set()


def test_a_worker_taken_as_lost_while_alive_gives_the_job_back(client, settings, gated, dataset, caplog):
    """A worker that stalled past the bound (caused here by backdating its heartbeat: a stalled event loop cannot
    be made on demand) stops its run when it sees the record re-queued, and leaves the job in arq's queue: it
    runs again and succeeds, with one patch."""
    from redis import Redis

    caplog.set_level("INFO", logger="fairpatch.worker")
    model = f"gated-stalled-{RUN}"
    register(client, model, gated.url)
    gated.opened.clear()
    seen = gated.arrived
    other = settings.model_copy(update={"job_queue": f"{settings.job_queue}:stalled", "job_heartbeat_timeout_s": 6.0})
    with ServerThread(create_app(other)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c, \
            WorkerThread(other, other.redis_url), Redis.from_url(other.redis_url) as redis:
        job = submit(c, model, dataset, budget=300)
        until(lambda: gated.arrived > seen, "the fit's first upstream request")
        redis.hset(f"fp:job:{job['id']}", "heartbeat_at", "1000000000.0")  # as if it had stalled since 2001
        requeued = c.get(f"/v1/jobs/{job['id']}").json()
        assert requeued["status"] == "queued" and "stopped answering at 2001-09-09" in requeued["progress"]["stage"]
        until(lambda: "no longer this worker's" in caplog.text, "the worker to notice")
        gated.opened.set()
        done = wait(c, job["id"])
    assert done["status"] == "succeeded", done
    patches = client.get(f"/v1/models/{model}/versions/1/patches").json()["patches"]
    assert [p["id"] for p in patches] == [done["result"]["patch_id"]]


# ---------------------------------------------------------------- Redis killed and restarted under a worker


class RedisProcess:
    """redis-server on a unix socket in a short temp dir, with a password, an append-only file (written on every
    command, so a SIGKILL loses nothing) and no TCP port."""

    PASSWORD = "s3cret-redis-pw-7d41"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fp-redis-"))
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://:{self.PASSWORD}@{self.socket}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--requirepass", self.PASSWORD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        until(self.socket.exists, "redis-server's socket", timeout=30, every=0.01)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        for f in sorted(self.dir.rglob("*"), reverse=True):
            f.unlink() if f.is_file() or f.is_socket() else f.rmdir()
        self.dir.rmdir()


@pytest.fixture()
def own_redis() -> Iterator[RedisProcess]:
    r = RedisProcess()
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def fast_upstream(adult_model):
    with ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult"))) as server:
        yield server.url


def test_a_worker_survives_redis_going_away_and_runs_jobs_queued_after_it_is_back(own_redis, fast_upstream,
                                                                                  adult, tmp_path, caplog):
    caplog.set_level("INFO")
    settings = Settings(data_dir=tmp_path / "gw", redis_url=own_redis.url, admin_key=KEY,
                        job_queue=f"test-redis-restart:{RUN}")
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c, \
            worker_process(tmp_path / "worker.log", **worker_env(settings, 30.0)) as w:
        register(c, "adult", fast_upstream)
        r = c.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                   headers={"content-type": "text/csv"})
        assert r.status_code == 201, r.text
        dataset = r.json()["id"]
        until(lambda: "worker ready" in w.log(), "the worker to start")

        own_redis.kill()
        until(lambda: "lost Redis at" in w.log(), "the worker to notice Redis is gone")
        assert w.process.poll() is None, w.log()
        assert c.get("/v2/health/ready").json() == {"ready": True, "redis": False}  # serves what it holds

        own_redis.start()  # the same socket and data: registrations and the dataset come back
        until(lambda: c.get("/v2/health/ready").json() == {"ready": True}, "the gateway to reach Redis again")
        done = wait(c, submit(c, "adult", dataset, budget=300)["id"])
        assert done["status"] == "succeeded", (done, w.log())
        assert w.process.poll() is None
        log = w.log()
    assert log.count("lost Redis at") == 1 and log.count("answers again") == 1, log  # once per outage
    assert RedisProcess.PASSWORD not in log and "unix://:***@" in log
    assert RedisProcess.PASSWORD not in caplog.text and "unix://:***@" in caplog.text


def test_a_job_running_through_a_redis_outage_finishes_once_redis_is_back(own_redis, gated, adult, tmp_path):
    settings = Settings(data_dir=tmp_path / "gw", redis_url=own_redis.url, admin_key=KEY,
                        job_queue=f"test-redis-midjob:{RUN}")
    spec = {"name": "adult", "version": "1", "groups": ["Female", "Male"],
            "upstream": {"url": gated.url, "model_name": "adult", "input_name": "input", "output_name": "logits",
                         "output_kind": "logits", "timeout_s": 300}}  # the gate holds requests through the outage
    gated.opened.clear()
    seen = gated.arrived
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c, \
            worker_process(tmp_path / "worker.log", **worker_env(settings, 300.0)) as w:
        assert c.post("/v1/models", json=spec).status_code == 201
        r = c.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                   headers={"content-type": "text/csv"})
        job = submit(c, "adult", r.json()["id"], budget=300)
        until(lambda: gated.arrived > seen, "the fit's first upstream request")

        own_redis.kill()
        until(lambda: "lost Redis at" in w.log(), "the worker to notice Redis is gone")
        own_redis.start()
        until(lambda: c.get("/v2/health/ready").json() == {"ready": True}, "the gateway to reach Redis again")
        gated.opened.set()
        done = wait(c, job["id"])
        assert done["status"] == "succeeded", (done, w.log())
        assert done["result"]["queries_used"] <= 300 and w.process.poll() is None
        patches = c.get("/v1/models/adult/versions/1/patches").json()["patches"]
        assert [p["id"] for p in patches] == [done["result"]["patch_id"]]


# ---------------------------------------------------------------- secrets in logs


def test_no_password_or_admin_key_in_the_logs_of_the_gateway_and_the_worker(own_redis, tmp_path):
    env = clean_env(FAIRPATCH_REDIS_URL=own_redis.url, FAIRPATCH_ADMIN_KEY=KEY, FAIRPATCH_LOG_LEVEL="debug",
                    FAIRPATCH_DATA_DIR=str(tmp_path), FAIRPATCH_JOB_QUEUE=f"test-secrets:{RUN}")
    # a worker that finds no Redis says where it looked, without the password
    missing = own_redis.url.replace("redis.sock", "nothing-here.sock")
    p = subprocess.run([sys.executable, "-c", CLI, "worker", "--wait", "0.2"], cwd=REPO,
                       env={**env, "FAIRPATCH_REDIS_URL": missing}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no Redis answers at unix://:***@" in p.stderr, p.stderr
    logs = p.stdout + p.stderr

    with worker_process(tmp_path / "worker.log", **{k: v for k, v in env.items() if k.startswith("FAIRPATCH")}) as w, \
            served([sys.executable, "-c", CLI, "serve", "--port", "0", "--access-log"], env=env, cwd=REPO,
                   log_path=tmp_path / "serve.log", name="fairpatch serve") as server:
        base = server.url
        until(lambda: _ready(base), "the gateway to serve", timeout=120)
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 403
        until(lambda: "worker ready" in w.log(), "the worker to start")
    served_log, worked = server.log(), w.log()
    # the lines that name Redis are there, masked: the gateway's "Redis at", the worker's start-up line
    assert "Redis at unix://:***@" in served_log and "on unix://:***@" in worked, (served_log, worked)
    for text in (logs, served_log, worked):
        assert RedisProcess.PASSWORD not in text and KEY not in text


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _in_append_only_file(data_dir: Path, key: str) -> bool:
    """Whether a Redis append-only file under `data_dir` holds `key` in a transaction written whole (its EXEC after
    the key's last mention): what a SIGKILLed redis-server reads back when it starts again."""
    for aof in data_dir.rglob("*.aof"):
        text = aof.read_bytes()
        last = text.rfind(key.encode())
        if last != -1 and text.rfind(b"EXEC") > last:
            return True
    return False


def answers(redis) -> bool:
    from redis.exceptions import RedisError

    try:
        return bool(redis.ping())
    except RedisError:  # not listening yet, or still loading its data
        return False


def test_the_embedded_redis_is_started_again_when_it_dies(tmp_path):
    from redis import Redis

    embedded = EmbeddedRedis(tmp_path, watch_s=0.05)
    with embedded as url:
        first = embedded.process.pid
        os.kill(first, signal.SIGKILL)
        until(lambda: embedded.process is not None and embedded.process.pid != first, "a new redis-server")
        with Redis.from_url(url) as r:
            assert until(lambda: answers(r), "the new redis-server to answer")
        second = embedded.process.pid
    assert not alive(first) and not alive(second) and not Path(embedded.socket_path).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_serve_in_embedded_mode_rides_out_its_redis_dying(tmp_path, fast_upstream, adult):
    """`fairpatch serve` with no Redis configured: its redis-server is SIGKILLed; the gateway starts it again,
    its worker (the same code as `fairpatch worker`) reconnects, and a job submitted afterwards runs."""
    env = clean_env(FAIRPATCH_DATA_DIR=str(tmp_path / "data"), FAIRPATCH_ADMIN_KEY=KEY)
    with served([sys.executable, "-c", CLI, "serve", "--port", "0"], env=env, cwd=REPO,
                log_path=tmp_path / "serve.log", name="fairpatch serve") as server:
        base, log, serve = server.url, server.log, server.process
        until(lambda: _ready(base) and "worker ready" in log(), "the gateway and its worker", timeout=120)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            register(c, "adult", fast_upstream)
            r = c.post("/v1/datasets", params={"label": "income", "group": "sex"},
                       content=adult_csv(adult, slice(2000)), headers={"content-type": "text/csv"})
            assert r.status_code == 201, r.text
            # The embedded Redis appends to its file every second (appendfsync everysec: at most a second or two
            # of writes lost to a crash, by design), so the kill waits until the upload's transaction is on disk.
            until(lambda: _in_append_only_file(tmp_path / "data", r.json()["id"]), "the upload in Redis's AOF")
            (redis_pid,) = [p for p in children(serve.pid) if "redis-server" in Path(f"/proc/{p}/cmdline").read_text()]
            (worker_pid,) = worker_children(serve.pid)
            os.kill(redis_pid, signal.SIGKILL)
            until(lambda: "starting it again" in log(), "the gateway to start its Redis again")
            until(lambda: _ready(base), "the gateway to reach its Redis again")
            done = wait(c, submit(c, "adult", r.json()["id"], budget=300)["id"])
            assert done["status"] == "succeeded", (done, log())
        assert worker_children(serve.pid) == [worker_pid], log()  # the same worker: it did not exit


# ---------------------------------------------------------------- predictions through a Redis outage


def test_predictions_are_served_and_patched_while_redis_is_killed_and_restarted(own_redis, fast_upstream, adult,
                                                                                adult_model, tmp_path):
    """A bounded load of predictions before, during and after an outage: every one answered 200 with the active
    patch. The outage outlasts the gateway's registration cache and its patch re-check, so both are served
    from memory while Redis is gone."""
    from patcher.oracle import OnnxOracle
    from patcher.tuning import TuningData
    from service.infer import SPEC_TTL_S
    from tests.conftest import fit

    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator")
    settings = Settings(data_dir=tmp_path / "gw", redis_url=own_redis.url, admin_key=KEY, patch_recheck_s=1.0)
    X = adult.test.X[:8].astype("float32")
    request = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        register(c, "adult", fast_upstream)
        r = c.post("/v1/models/adult/versions/1/patches", content=patch.for_model("adult", "1").to_bytes(),
                   headers={"content-type": "application/zip"})
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        assert c.post(f"/v1/models/adult/versions/1/patches/{pid}/activate").status_code == 200

        answers: list[tuple[int, str | None]] = []

        def predict(n: int) -> None:
            for _ in range(n):
                r = c.post("/v2/models/adult/versions/1/infer", json=request)
                answers.append((r.status_code, r.headers.get("fairpatch-patch")))

        predict(50)
        own_redis.kill()
        outage_until = time.monotonic() + 3 * max(SPEC_TTL_S, settings.patch_recheck_s)
        during = 0
        while during < 100 or time.monotonic() < outage_until:  # a load, not a measurement
            predict(10)
            during += 10
        # Redis was really gone all along; the gateway stayed in rotation, serving what it holds
        assert c.get("/v2/health/ready").json() == {"ready": True, "redis": False}
        own_redis.start()
        until(lambda: c.get("/v2/health/ready").json() == {"ready": True}, "the gateway to reach Redis again")
        predict(50)
    failed = [a for a in answers if a != (200, pid)]
    assert not failed and len(answers) == 100 + during, failed[:5]


# ---------------------------------------------------------------- predictions through an upstream outage


class UpstreamProcess:
    """`fairpatch upstream` serving the Adult reference model on loopback. It binds port 0 the first time (so
    it cannot lose its port to another process) and, SIGKILLed, is started again on the port it had, where
    the registration points."""

    def __init__(self, onnx: Path, log_path: Path) -> None:
        self.onnx, self.log_path = onnx, log_path
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-c", CLI, "upstream", "--onnx", str(self.onnx),
                                             "--name", "adult", "--port", str(self.port), "--threads", "1",
                                             "--log-level", "warning"], cwd=REPO, env=clean_env(),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def serving() -> bool:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            self.port = self.port or listening_port(self.process.pid) or 0
            return bool(self.port) and _ready(self.url)

        until(serving, "the upstream to serve", timeout=120)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class PredictionLoad:
    """Callers in threads sending the same V2 request until stopped; every answer kept as (status, patch header,
    error) in arrival order, and the answers of one phase (`mark`) told apart from the next."""

    def __init__(self, url: str, model: str, request: dict, callers: int = 3) -> None:
        self.url, self.model, self.request, self.callers = url, model, request, callers
        self.answers: list[tuple[int, str | None, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set():
                r = c.post(f"/v2/models/{self.model}/versions/1/infer", json=self.request)
                error = r.json().get("error") if r.status_code != 200 else None
                with self._lock:
                    self.answers.append((r.status_code, r.headers.get("fairpatch-patch"), error))

    def count(self, answer, since: int = 0) -> int:
        with self._lock:
            return sum(1 for a in self.answers[since:] if answer(a))

    def mark(self) -> int:
        with self._lock:
            return len(self.answers)

    def since(self, mark: int) -> list[tuple[int, str | None, str | None]]:
        with self._lock:
            return self.answers[mark:]

    def __enter__(self) -> PredictionLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def eraser_patch(adult, adult_model):
    """A group-free Eraser patch (bias=estimator: requests need no group input)."""
    from patcher.oracle import OnnxOracle
    from patcher.tuning import TuningData
    from tests.conftest import fit

    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator")
    return patch


def activate(c: httpx.Client, patch, model: str = "adult") -> str:
    r = c.post(f"/v1/models/{model}/versions/1/patches", content=patch.for_model(model, "1").to_bytes(),
               headers={"content-type": "application/zip"})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert c.post(f"/v1/models/{model}/versions/1/patches/{pid}/activate").status_code == 200
    return pid


def test_an_upstream_killed_and_restarted_under_load_costs_502s_only_while_it_is_down(redis_url, adult, adult_model,
                                                                                     tmp_path):
    """Three callers send predictions while the upstream process is SIGKILLed and started again on its port.
    While it is down every failed prediction is a 502 naming the upstream (never a 500, and no 504: nothing
    timed out); once it is back, predictions are patched 200s again."""
    (tmp_path / "adult.onnx").write_bytes(adult_model.onnx_bytes)
    upstream = UpstreamProcess(tmp_path / "adult.onnx", tmp_path / "upstream.log")
    settings = Settings(data_dir=tmp_path / "gw", redis_url=redis_url, admin_key=KEY,
                        job_queue=f"test-upstream-restart:{RUN}")
    X = adult.test.X[:8].astype("float32")
    request = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    upstream.start()
    try:
        with ServerThread(create_app(settings)) as server, \
                httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            model = f"up-{RUN}"
            register(c, model, upstream.url)
            pid = activate(c, eraser_patch(adult, adult_model), model)
            good = lambda a: a == (200, pid, None)  # noqa: E731
            with PredictionLoad(server.url, model, request) as load:
                until(lambda: load.count(good) >= 30, "patched predictions before the outage")
                before = load.mark()
                upstream.kill()
                killed_at = time.monotonic()
                until(lambda: load.count(lambda a: a[0] == 502, before) >= 30, "predictions failing in the outage")
                upstream.start()  # returns once the new process answers its health check
                restarted = load.mark()
                restarted_at = time.monotonic()
                until(lambda: load.count(good, restarted) >= 1, "a patched prediction after the restart")
                recovered_at = time.monotonic()
                after = load.mark()
                until(lambda: load.mark() >= after + 60, "predictions after the restart")
                answers = load.since(0)
    finally:
        upstream.stop()
    assert all(good(a) for a in answers[:before]), answers[:before]
    outage = answers[before:after]
    failed = [a for a in outage if not good(a)]
    assert failed and all(a[0] == 502 for a in failed), sorted({a[:1] + a[2:] for a in failed})
    assert all("upstream" in a[2] for a in failed), failed[:3]
    # once one patched 200 came back, only the callers' requests still in flight from the outage may fail
    late = [a for a in answers[after:] if not good(a)]
    assert len(late) <= load.callers and all(a[0] == 502 for a in late), late
    print(f"\nupstream outage: {len(failed)} of {len(outage)} predictions failed (all 502) and {len(late)} late, "
          f"{len(answers[:before]) + len(answers[after:]) - len(late)} patched 200s around it; down "
          f"{restarted_at - killed_at:.2f} s; patched again {recovered_at - restarted_at:.2f} s after the new "
          f"upstream answered its health check")


def test_redis_killed_and_restarted_under_load_keeps_predictions_patched_and_the_worker_runs_the_next_job(
        own_redis, fast_upstream, adult, adult_model, tmp_path):
    """Three callers send predictions while Redis is SIGKILLed and started again, with a standalone
    `fairpatch worker` attached: every prediction, before, during and after the outage, is a patched 200 (the
    outage outlasts the registration cache and the patch re-check, so both are served from memory); the worker
    stays up, reconnects, and runs a job queued after Redis is back."""
    from service.infer import SPEC_TTL_S

    settings = Settings(data_dir=tmp_path / "gw", redis_url=own_redis.url, admin_key=KEY, patch_recheck_s=1.0,
                        job_queue=f"test-redis-load:{RUN}")
    X = adult.test.X[:8].astype("float32")
    request = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c, \
            worker_process(tmp_path / "worker.log", **worker_env(settings, 30.0)) as w:
        register(c, "adult", fast_upstream)
        pid = activate(c, eraser_patch(adult, adult_model))
        r = c.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=adult_csv(adult, slice(2000)),
                   headers={"content-type": "text/csv"})
        assert r.status_code == 201, r.text
        until(lambda: "worker ready" in w.log(), "the worker to start")
        good = lambda a: a == (200, pid, None)  # noqa: E731
        with PredictionLoad(server.url, "adult", request) as load:
            until(lambda: load.count(good) >= 30, "patched predictions before the outage")
            before = load.mark()
            own_redis.kill()
            killed_at = time.monotonic()
            until(lambda: "lost Redis at" in w.log(), "the worker to notice Redis is gone")
            outage_until = killed_at + 3 * max(SPEC_TTL_S, settings.patch_recheck_s)
            until(lambda: time.monotonic() > outage_until and load.mark() >= before + 100, "a load in the outage",
                  every=0.2)  # a load, not a measurement
            # Redis was really gone all along; the gateway stayed in rotation, serving what it holds
            assert c.get("/v2/health/ready").json() == {"ready": True, "redis": False}
            during = load.mark() - before
            own_redis.start()
            restarted_at = time.monotonic()
            until(lambda: c.get("/v2/health/ready").json() == {"ready": True}, "the gateway to reach Redis again")
            ready_at = time.monotonic()
            until(lambda: "answers again" in w.log(), "the worker to reconnect")
            worker_back_at = time.monotonic()
            job = submit(c, "adult", r.json()["id"], budget=300)
            done = wait(c, job["id"])
            job_done_at = time.monotonic()
            after = load.mark()
            until(lambda: load.mark() >= after + 30, "predictions after the outage")
            answers = load.since(0)
        assert w.process.poll() is None, w.log()
    failed = [a for a in answers if not good(a)]
    assert not failed, failed[:5]
    assert done["status"] == "succeeded", (done, w.log())
    print(f"\nRedis outage under load: {len(failed)} of {len(answers)} predictions failed ({during} during the "
          f"outage, {restarted_at - killed_at:.2f} s down); gateway ready {ready_at - restarted_at:.2f} s and "
          f"worker reconnected {worker_back_at - restarted_at:.2f} s after the restart; the job queued then "
          f"succeeded {job_done_at - worker_back_at:.2f} s later")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_serve_in_embedded_mode_runs_again_the_job_of_its_worker_killed_mid_job(tmp_path, gated, adult):
    """`fairpatch serve` with its own worker: the worker is SIGKILLed while its fit waits on the (closed) gate.
    The gateway starts a new worker, the job goes back to the queue within the heartbeat bound and runs on the
    new worker (its fit reaches the upstream again), then succeeds with one patch: no frozen `running`."""
    env = clean_env(FAIRPATCH_DATA_DIR=str(tmp_path / "data"), FAIRPATCH_ADMIN_KEY=KEY,
                    FAIRPATCH_JOB_HEARTBEAT_TIMEOUT_S="5")
    try:
        with served([sys.executable, "-c", CLI, "serve", "--port", "0"], env=env, cwd=REPO,
                    log_path=tmp_path / "serve.log", name="fairpatch serve") as server, \
                httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            serve, log = server.process, server.log
            until(lambda: _ready(server.url) and "worker ready" in log(), "the gateway and its worker", timeout=120)
            register(c, "adult", gated.url)
            r = c.post("/v1/datasets", params={"label": "income", "group": "sex"},
                       content=adult_csv(adult, slice(2000)), headers={"content-type": "text/csv"})
            assert r.status_code == 201, r.text
            gated.opened.clear()
            seen = gated.arrived
            job = submit(c, "adult", r.json()["id"], budget=300)
            until(lambda: gated.arrived > seen, "the fit's first upstream request")
            (worker_pid,) = worker_children(serve.pid)
            assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
            os.kill(worker_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            until(lambda: not alive(worker_pid), "the killed worker to be reaped")
            at_kill = gated.arrived
            until(lambda: [p for p in worker_children(serve.pid) if p != worker_pid], "a new worker")
            until(lambda: gated.arrived > at_kill, "the job to run again on the new worker")
            again_at = time.monotonic()
            record = c.get(f"/v1/jobs/{job['id']}").json()
            assert record["status"] == "running" and record["finished_at"] is None, record
            gated.opened.set()
            done = wait(c, job["id"])
            assert done["status"] == "succeeded", (done, log())
            patches = c.get("/v1/models/adult/versions/1/patches").json()["patches"]
            assert [p["id"] for p in patches] == [done["result"]["patch_id"]]
    finally:
        gated.opened.set()  # held requests finish, so the gate's server can stop
    print(f"\nembedded worker SIGKILLed mid-job: the job ran again on the new worker {again_at - killed_at:.2f} s "
          "after the kill (heartbeat bound 5 s), then succeeded")


def test_readiness_through_a_redis_outage_depends_on_having_reached_redis_and_on_the_setting(own_redis, tmp_path):
    """A gateway that never reached Redis holds nothing to serve: 503. One that has stays ready through an outage
    (saying redis false), unless ready_without_redis is off, when it is 503 until Redis answers again."""
    own_redis.kill()
    lenient = Settings(data_dir=tmp_path / "a", redis_url=own_redis.url, admin_key=KEY)
    strict = Settings(data_dir=tmp_path / "b", redis_url=own_redis.url, admin_key=KEY, ready_without_redis=False)
    with ServerThread(create_app(lenient)) as a, ServerThread(create_app(strict)) as b:
        for server in (a, b):
            r = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
            assert r.status_code == 503 and r.json() == {"ready": False, "redis": False}
        own_redis.start()
        for server in (a, b):
            until(lambda s=server: httpx.get(f"{s.url}/v2/health/ready", timeout=10).json() == {"ready": True},
                  "the gateway to reach Redis")
        own_redis.kill()
        r = httpx.get(f"{a.url}/v2/health/ready", timeout=10)
        assert r.status_code == 200 and r.json() == {"ready": True, "redis": False}
        r = httpx.get(f"{b.url}/v2/health/ready", timeout=10)
        assert r.status_code == 503 and r.json() == {"ready": False, "redis": False}
        own_redis.start()
        until(lambda: httpx.get(f"{b.url}/v2/health/ready", timeout=10).json() == {"ready": True},
              "the strict gateway to be ready again")
