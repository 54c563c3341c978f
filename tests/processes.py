"""Servers in subprocesses for tests: each binds port 0 itself and the test reads the port it got.

A port picked by the test, closed and handed to a subprocess can be taken by another process in between
(CI runs many servers at once); a server that binds port 0 cannot lose its port. Waits are on conditions
with generous bounds, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psutil

T = TypeVar("T")


def until(condition: Callable[[], T], what: str, timeout: float = 120.0, every: float = 0.02) -> T:
    """`condition()`'s first truthy value; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on, once it does (its own sockets, not its children's)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:  # gone, or not yet readable
        return None
    ports = [c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN]
    return ports[0] if ports else None


def ready(url: str, path: str = "/v2/health/ready") -> httpx.Response | None:
    """The server's 200 answer on `path`, or None while it does not give one."""
    try:
        r = httpx.get(f"{url}{path}", timeout=5)
    except httpx.TransportError:
        return None
    return r if r.status_code == 200 else None


@dataclass
class Served:
    process: subprocess.Popen
    log_path: Path
    port: int = 0
    returncode: int | None = None  # set when the context exits: asserted by the caller, after its own checks

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def served(argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, name: str = "the server",
           timeout: float = 120.0, stop_timeout: float = 60.0) -> Iterator[Served]:
    """Run a server command that binds port 0 (`argv` says so) until it listens; SIGTERM it on exit.

    Output goes to `log_path` (a pipe nobody reads could fill up and block the server)."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    server = Served(process, log_path)
    try:
        def listening() -> int | None:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{server.log()}"
            return listening_port(process.pid)

        server.port = until(listening, f"{name} to listen", timeout=timeout)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            server.returncode = process.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            server.returncode = process.wait()
