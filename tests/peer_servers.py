"""Real model servers on loopback, each a process of its own virtualenv (tests/peer_envs.py), serving a
scikit-learn model trained on the Adult tune rows by the peer's own interpreter (tests/peer_models/train.py):

- MLServer 1.7.1 with mlserver-sklearn (Open Inference Protocol V2), model settings as a user writes them;
- KServe's Python ModelServer with a `kserve.Model` (V1 `:predict` and V2 on the same port);
- `mlflow models serve` (`/invocations`).

Each is started on free loopback ports, waited on until its readiness route answers 200 (a condition, with
a bound only for a server that never comes up), and stopped with SIGTERM. They cannot all bind port 0 and
report it, as tests/processes.served expects (MLServer listens on two ports, mlflow ignores `-p 0` and serves
from a child process), so each gets free ports, and a bind race (a port taken between choosing it and the
server binding it) is retried with new ones. `CountingProxy` sits between the
gateway and a peer to count the rows the gateway sends upstream, independently of the gateway's own report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.peer_envs import PeerEnv
from tests.processes import ready, until

HERE = Path(__file__).resolve().parent
MODELS = HERE / "peer_models"
READY_TIMEOUT_S = 300.0  # a bound for a server that never comes up on a loaded 2-core box, not a speed check
BIND_RETRIES = 3
BIND_FAILED = ("address already in use", "errno 98", "eaddrinuse", "failed to bind", "failed to add port")
MODEL_NAME = "adult"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerExited(RuntimeError):
    def __init__(self, name: str, code: int, log: str) -> None:
        super().__init__(f"{name} exited with {code} before it was ready; its log ends:\n{log[-4000:]}")
        self.log = log


@dataclass
class PeerServer:
    name: str
    url: str
    popen: subprocess.Popen
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            # The process group: MLServer and KServe may fork workers of their own.
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux), so a killed test
    run leaves no server behind holding its ports."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    with suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_ready(server: PeerServer, ready_path: str, timeout: float = READY_TIMEOUT_S) -> None:
    def up() -> httpx.Response | None:
        if server.popen.poll() is not None:
            raise PeerExited(server.name, server.popen.returncode, server.text())
        return ready(server.url, ready_path)

    try:
        until(up, f"{server.name} to answer 200 on {ready_path}", timeout=timeout, every=0.2)
    except AssertionError as e:
        server.stop()
        raise AssertionError(f"{e}; its log ends:\n{server.text()[-4000:]}") from None


def _start(name: str, build: Callable[[dict[str, int]], tuple[list[str], dict[str, str], Path]],
           port_names: tuple[str, ...], ready_path: str, logdir: Path) -> PeerServer:
    """Start the server on fresh free ports, retrying (with new ports) only when it failed to bind."""
    for attempt in range(BIND_RETRIES):
        ports = {p: free_port() for p in port_names}
        argv, env, cwd = build(ports)
        log = logdir / f"{name}.{attempt}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        server = PeerServer(name, f"http://127.0.0.1:{ports['http']}", popen, log, ports)
        try:
            _wait_ready(server, ready_path)
            return server
        except PeerExited as e:
            if attempt + 1 < BIND_RETRIES and any(s in e.log.lower() for s in BIND_FAILED):
                continue
            raise
    raise AssertionError("unreachable")


def write_training_rows(X: np.ndarray, y: np.ndarray, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "X.npy", np.asarray(X, dtype=np.float32), allow_pickle=False)
    np.save(dest / "y.npy", np.asarray(y, dtype=np.int64), allow_pickle=False)
    return dest


def train(env: PeerEnv, rows: Path, dest: Path, fmt: str) -> Path:
    """The model in the peer's format, trained by the peer's own scikit-learn on the given rows."""
    done = subprocess.run([str(env.python), str(MODELS / "train.py"), str(rows), str(dest), fmt],
                          env=env.environ(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"training the {fmt} model failed:\n{done.stdout}\n{done.stderr}")
    return dest


# --- the servers ----------------------------------------------------------------------------------------

def start_mlserver(env: PeerEnv, model_dir: Path, logdir: Path) -> PeerServer:
    """`mlserver start` over a folder holding the model's model-settings.json; the server's own settings
    (loopback, our ports, no metrics server, inference in the main process) in its settings.json."""
    def build(ports: dict[str, int]) -> tuple[list[str], dict[str, str], Path]:
        (model_dir / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": ports["http"], "grpc_port": ports["grpc"],
            "metrics_endpoint": None, "parallel_workers": 0, "load_models_at_startup": True}))
        return [str(env.bin / "mlserver"), "start", str(model_dir)], env.environ(), model_dir

    return _start("mlserver", build, ("http", "grpc"), f"/v2/models/{MODEL_NAME}/ready", logdir)


def start_kserve(env: PeerEnv, model_dir: Path, logdir: Path) -> PeerServer:
    """tests/peer_models/kserve_server.py: KServe's ModelServer with a kserve.Model over the joblib file."""
    def build(ports: dict[str, int]) -> tuple[list[str], dict[str, str], Path]:
        return ([str(env.python), str(MODELS / "kserve_server.py"), "--model_name", MODEL_NAME,
                 "--model_dir", str(model_dir), "--http_port", str(ports["http"]), "--grpc_port", str(ports["grpc"]),
                 "--workers", "1"], env.environ(), model_dir)

    return _start("kserve", build, ("http", "grpc"), f"/v2/models/{MODEL_NAME}/ready", logdir)


def start_mlflow(env: PeerEnv, model_dir: Path, logdir: Path) -> PeerServer:
    """`mlflow models serve` in the peer's own environment (--env-manager local: no conda, no download).
    It ignores `-p 0`, so it gets a free port, and a new one if the bind races."""
    def build(ports: dict[str, int]) -> tuple[list[str], dict[str, str], Path]:
        environ = env.environ()
        environ["MLFLOW_TRACKING_URI"] = f"file://{logdir / 'mlruns'}"  # nothing written outside the test's folder
        return ([str(env.bin / "mlflow"), "models", "serve", "-m", str(model_dir / "model"), "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(ports["http"]), "-w", "1"], environ, model_dir)

    return _start("mlflow", build, ("http",), "/ping", logdir)


STARTERS: dict[str, Callable[[PeerEnv, Path, Path], PeerServer]] = {
    "mlserver": start_mlserver, "kserve": start_kserve, "mlflow": start_mlflow}


@contextmanager
def peer_server(kind: str, env: PeerEnv, X: np.ndarray, y: np.ndarray, workdir: Path) -> Iterator[PeerServer]:
    """Train the model in the peer's format, serve it, and stop the server on exit."""
    rows = write_training_rows(X, y, workdir / "rows")
    model_dir = train(env, rows, workdir / kind, kind)
    server = STARTERS[kind](env, model_dir, workdir)
    try:
        yield server
    finally:
        server.stop()


# --- counting what reaches the upstream -------------------------------------------------------------------

def rows_in(body: bytes, headers: dict[str, str]) -> int:
    """Rows in one inference request: V2 (JSON or binary: the header's first input's shape), V1 `instances`,
    MLflow `inputs`/`instances`/`dataframe_split`."""
    n = headers.get("inference-header-content-length")
    doc: Any = json.loads(body[: int(n)] if n else body)
    if "inputs" in doc and isinstance(doc["inputs"], list) and doc["inputs"] and isinstance(doc["inputs"][0], dict) \
            and "shape" in doc["inputs"][0]:
        return int(doc["inputs"][0]["shape"][0])
    for key in ("instances", "inputs"):
        if key in doc:
            return len(doc[key])
    if "dataframe_split" in doc:
        return len(doc["dataframe_split"]["data"])
    raise ValueError(f"no rows in a request with keys {sorted(doc)}")


class CountingProxy:
    """A loopback reverse proxy that forwards everything to `target` and counts inference requests and rows
    (POSTs), so a test can bound what the gateway sent upstream without trusting the gateway's own count."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.rows = 0
        self.requests = 0
        self.content_types: set[str] = set()
        self._lock = threading.Lock()
        self._thread: Any = None

    def reset(self) -> None:
        with self._lock:
            self.rows = self.requests = 0
            self.content_types = set()

    def app(self) -> Callable:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=300)

        async def forward(request: Request) -> Response:
            body = await request.body()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            if request.method == "POST":
                n = rows_in(body, {k.lower(): v for k, v in headers.items()})
                with self._lock:
                    self.rows += n
                    self.requests += 1
                    self.content_types.add(request.headers.get("content-type", ""))
            url = f"{self.target}{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
            r = await client.request(request.method, url, content=body, headers=headers)
            drop = ("content-length", "transfer-encoding", "connection", "content-encoding")
            return Response(r.content, r.status_code, {k: v for k, v in r.headers.items() if k.lower() not in drop})

        return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])

    def __enter__(self) -> CountingProxy:
        from service.serve_thread import ServerThread

        self._thread = ServerThread(self.app())
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return self._thread.url

    def __exit__(self, *_exc: object) -> None:
        self._thread.stop()


if __name__ == "__main__":  # python tests/peer_servers.py KIND: serve the model until Ctrl-C (manual checks)
    from patcher.datasets import load_dataset
    from tests.peer_envs import ensure

    kind = sys.argv[1]
    data = load_dataset("adult", "sex")
    work = Path(sys.argv[2] if len(sys.argv) > 2 else f"/tmp/peer-{kind}")
    work.mkdir(parents=True, exist_ok=True)
    with peer_server(kind, ensure(kind), data.tune.X, data.tune.y, work) as s:
        print(f"{kind} at {s.url} (log {s.log})", flush=True)
        with suppress(KeyboardInterrupt):
            signal.pause()
