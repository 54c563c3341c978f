"""tests/peer_envs.py itself, without the network: one build per venv under concurrent callers, a failed build
leaves no half venv and says why, a venv that cannot be built fails a test under CI and skips it elsewhere, and
peer_servers retries a server that lost its port."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests import peer_envs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRPATCH_PEER_VENVS", str(tmp_path))
    # "pip" is already in a fresh venv: pip is satisfied without asking an index
    monkeypatch.setitem(peer_envs.PEERS, "tiny", ("pip",))
    monkeypatch.setitem(peer_envs.PEERS, "broken", ("pip",))
    return tmp_path


@pytest.fixture
def no_python(monkeypatch):
    """A machine where the venv cannot even be made (quicker to stage than a pip failure)."""
    monkeypatch.setattr(peer_envs, "_base_python", lambda: "/nonexistent/python3")


def test_concurrent_callers_build_one_venv(cache):
    got: list[peer_envs.PeerEnv] = []
    threads = [threading.Thread(target=lambda: got.append(peer_envs.ensure("tiny"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0].path == got[1].path == peer_envs.venv_path("tiny")
    assert got[0].python.exists() and (got[0].path / ".ready").exists()
    log = got[0].path.with_name(got[0].path.name + ".log").read_text()
    assert log.count("-m venv") == 1  # the second caller waited on the lock and found it built
    env = got[0].environ({"PATH": "/usr/bin", "PYTHONPATH": "/repo"})
    assert "PYTHONPATH" not in env and env["PATH"].startswith(str(got[0].bin))


def test_a_failed_build_says_why_and_leaves_no_half_venv(cache, no_python):
    with pytest.raises(peer_envs.PeerEnvUnavailable) as e:
        peer_envs.ensure("broken")
    assert "building the broken venv failed" in str(e.value) and "/nonexistent/python3" in str(e.value)
    assert not peer_envs.venv_path("broken").exists()


def test_require_fails_under_ci_and_skips_elsewhere(cache, no_python, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="could not be built"):
        peer_envs.require("broken")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="could not be built"):
        peer_envs.require("broken")


def test_a_bind_race_is_retried_on_new_ports(tmp_path, monkeypatch):
    """tests/peer_servers.py's start: a server that loses its chosen port to another process is started again on
    a new one (here `python -m http.server`, given first a port that a socket already holds)."""
    import socket
    import sys

    from tests import peer_servers

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = peer_servers.free_port
    monkeypatch.setattr(peer_servers, "free_port", lambda: next(ports, None) or real())

    def build(p: dict[str, int]) -> tuple[list[str], dict[str, str], Path]:
        return [sys.executable, "-m", "http.server", str(p["http"]), "--bind", "127.0.0.1"], {}, tmp_path

    try:
        server = peer_servers._start("http.server", build, ("http",), "/", tmp_path)
        try:
            assert server.ports["http"] != taken.getsockname()[1]
            assert "already in use" in (tmp_path / "http.server.0.log").read_text().lower()
        finally:
            server.stop()
    finally:
        taken.close()
