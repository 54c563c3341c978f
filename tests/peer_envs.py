"""Virtual environments of the real model servers the tests put fairpatch in front of (MLServer, KServe,
MLflow). Each server pins its own dependencies, which clash with ours (and with each other), so each gets
its own virtualenv outside the project's `.venv`, built on first use from PyPI and cached by the hash of
its pins: `~/.cache/fairpatch/peer-venvs/<name>-<hash>` ($FAIRPATCH_PEER_VENVS overrides the folder).

A fresh machine builds them in the test set-up (`make test`); `python tests/peer_envs.py [NAME ...]` builds
them ahead. A build takes about a minute and 500-650 MB each. Where one cannot be built (no network), the
tests that need it fail with the reason under CI=true and skip with the reason elsewhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# scikit-learn pinned alike in every peer: the model each server loads is trained by the peer's own
# interpreter (tests/peer_models/train.py), so only the server's own pins matter for loading it.
# mlflow 3.18.0 names an mlflow-tracing 3.18.0 that PyPI does not have, hence 3.17.2.
SKLEARN = "scikit-learn==1.6.1"
PEERS: dict[str, tuple[str, ...]] = {
    "mlserver": ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", SKLEARN),
    "kserve": ("kserve==0.21.0", SKLEARN, "joblib", "PyYAML"),
    "mlflow": ("mlflow==3.17.2", SKLEARN),
}
BUILD_TIMEOUT_S = 1500.0  # pip on a loaded 2-core machine; a bound, not a speed check
LOCK_TIMEOUT_S = BUILD_TIMEOUT_S + 60.0  # another test process building the same venv


class PeerEnvUnavailable(RuntimeError):
    """The venv could not be built (no network, a pin that does not resolve): the message says why."""


@dataclass(frozen=True)
class PeerEnv:
    name: str
    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for the peer's own processes: its bin first on PATH, none of our PYTHONPATH."""
        env = dict(os.environ if base is None else base)
        for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(k, None)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        return env


def cache_root() -> Path:
    return Path(os.environ.get("FAIRPATCH_PEER_VENVS") or Path.home() / ".cache" / "fairpatch" / "peer-venvs")


def pins_hash(name: str) -> str:
    spec = json.dumps({"pins": PEERS[name], "python": sysconfig.get_python_version()})
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def venv_path(name: str) -> Path:
    return cache_root() / f"{name}-{pins_hash(name)}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (another pytest process, or xdist worker, may build the same venv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PeerEnvUnavailable(
                        f"{path}: still locked by another build after {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.5)  # polling a lock held by another process: there is no event to wait on
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _base_python() -> str:
    """The interpreter our venv was made from: a venv made from inside .venv would see .venv's packages."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _run(argv: list[str], log: Path, timeout: float) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise PeerEnvUnavailable(f"{' '.join(argv[:4])} ... exited {done.returncode}; the end of {log}:\n{tail}")


def _usable(path: Path) -> bool:
    """Built to the end (the stamp is written last) and its interpreter still there (the base Python it links to
    may have gone with a Python upgrade)."""
    return (path / ".ready").exists() and (path / "bin" / "python").exists()


def ensure(name: str) -> PeerEnv:
    """The peer's venv, built first if it is not in the cache (a ready venv has a `.ready` stamp)."""
    path = venv_path(name)
    stamp = path / ".ready"
    if _usable(path):
        return PeerEnv(name, path)
    with _locked(path.with_name(path.name + ".lock")):
        if _usable(path):  # built by whoever held the lock
            return PeerEnv(name, path)
        shutil.rmtree(path, ignore_errors=True)  # a half-built one from an interrupted run
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.with_name(path.name + ".log")
        log.write_text("")
        started = time.monotonic()
        try:
            _run([_base_python(), "-m", "venv", str(path)], log, 300)
            _run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *PEERS[name]], log, BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            shutil.rmtree(path, ignore_errors=True)  # half a venv is half a gigabyte; the log stays
            raise PeerEnvUnavailable(f"building the {name} venv timed out after {e.timeout:.0f} s (log: {log})") from e
        except (OSError, PeerEnvUnavailable) as e:
            shutil.rmtree(path, ignore_errors=True)
            if isinstance(e, PeerEnvUnavailable):
                raise
            raise PeerEnvUnavailable(f"building the {name} venv failed: {e}") from e
        stamp.write_text(json.dumps({"pins": PEERS[name], "build_s": round(time.monotonic() - started, 1)}))
    return PeerEnv(name, path)


def require(name: str) -> PeerEnv:
    """`ensure` for a test: where the venv cannot be built, the test fails with the reason under CI=true (a
    fresh CI machine must run it) and skips with the reason elsewhere (a laptop without network)."""
    import pytest

    try:
        return ensure(name)
    except PeerEnvUnavailable as e:
        reason = f"the {name} server's virtualenv could not be built: {e}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def size_mb(env: PeerEnv) -> float:
    return sum(p.stat().st_size for p in env.path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


if __name__ == "__main__":  # python tests/peer_envs.py [mlserver kserve mlflow]
    for n in sys.argv[1:] or list(PEERS):
        t0 = time.monotonic()
        e = ensure(n)
        print(f"{n}: {e.path} ({time.monotonic() - t0:.0f} s, {size_mb(e):.0f} MB)")
