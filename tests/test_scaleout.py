"""Scale-out across hosts: two gateways, two workers, one Redis and the upstream, each on a host of its own.

Each host is a Linux network namespace with its own address on one bridge (itself in a namespace of its own,
so nothing is added to the machine's network but one veth for this test process, the client) and its own
host name (a UTS namespace), so every byte between the parts crosses a network link that the test can cut.
Proven here: a patch activated through gateway A is served by gateway B (the propagation time is measured
and printed); jobs spread over both workers and each names its worker; killing a gateway loses no request
the client retried, and killing a worker loses no job; with Redis's link down the gateways keep serving the
active patch from their in-process cache. Needs root and `ip` (iproute2), `unshare` and `redis-server`;
skipped with the reason where they are missing, and failed instead under CI=true (CI runs as root).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 240.0  # a bound for conditions, not a speed check: seven processes on a loaded 2-core box
ADMIN_KEY = "scaleout-key"
HEARTBEAT_S = 10.0  # workers' heartbeat bound: a killed worker's job moves on after this
# Fixed ports are safe here: every host has an address of its own in a private namespace.
REDIS_PORT, UPSTREAM_PORT, GATEWAY_PORT = 6379, 9000, 8080


def _missing() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "not root: creating network namespaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN"
    for tool in ("ip", "unshare", "redis-server"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (iproute2, util-linux, redis-server)"
    probe = f"fp-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def can_netns() -> None:
    why = _missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs as root on Linux and must run the scale-out test: {why}")
        pytest.skip(why)


def sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def free_subnet() -> str:
    """A 10.x.y.0/24 that no address or route of this machine touches (random, so parallel runs differ)."""
    used = sh("ip", "-4", "addr") + sh("ip", "-4", "route")
    for _ in range(200):
        net = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        if f"{net}." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class Network:
    """Hosts (namespaces) on one bridge; the test process reaches them through one veth. Removed in `close`,
    even when set-up failed half way: every name carries a per-run tag, so runs cannot collide."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.net = free_subnet()
        self.switch = f"fp-{self.tag}-switch"
        self.namespaces: list[str] = []
        self.client_link = f"fp{self.tag}c"
        self.hosts: dict[str, tuple[str, str]] = {}  # name -> (namespace, address)

    def start(self) -> Network:
        self._netns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        peer = f"fp{self.tag}cs"
        sh("ip", "link", "add", self.client_link, "type", "veth", "peer", "name", peer)
        self._to_bridge(peer)
        sh("ip", "addr", "add", f"{self.net}.1/24", "dev", self.client_link)
        sh("ip", "link", "set", self.client_link, "up")
        return self

    def _netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _to_bridge(self, link: str) -> None:
        sh("ip", "link", "set", link, "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", link, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", link, "up")

    def add_host(self, name: str) -> str:
        """A namespace `fp-<tag>-<name>` with eth0 at the next address; returns the address."""
        ns, i = f"fp-{self.tag}-{name}", len(self.hosts) + 10
        self._netns(ns)
        inner, outer = f"fp{self.tag}{i}h", f"fp{self.tag}{i}s"
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
        self._to_bridge(outer)
        addr = f"{self.net}.{i}"
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = (ns, addr)
        return addr

    def link(self, name: str, up: bool) -> None:
        sh("ip", "-n", self.hosts[name][0], "link", "set", "eth0", "up" if up else "down")

    def argv(self, name: str, cmd: list[str]) -> list[str]:
        """`cmd` run on host `name`: in its network namespace, under its own host name."""
        return ["ip", "netns", "exec", self.hosts[name][0], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', name, *cmd]

    def close(self) -> None:
        for ns in reversed(self.namespaces):  # deleting a namespace deletes the veths in it, and their peers
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.client_link], capture_output=True)


def _die_with_test() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    # A test process killed outright runs no finalizer: its hosts go with it (the flag survives the execs).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Host:
    """One process on one host: output to a file, stopped (or killed) by its pid."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=logdir, preexec_fn=_die_with_test)

    @property
    def pid(self) -> int:  # `ip netns exec`, `unshare` and `sh -c exec` each exec the next: one pid throughout
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(60)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a host the test paused
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()


def wait_until(cond: Callable[[], Any], what: str, hosts: list[Host] = (), timeout: float = WAIT_S,
               every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for h in hosts:
            if h.popen.poll() is not None:
                raise AssertionError(f"{what}: {h.name} exited with {h.popen.returncode}:\n{h.text()[-3000:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {h.name}\n{h.text()[-2000:]}" for h in hosts)
            raise AssertionError(f"{what}, within {timeout:.0f}s\n{tails}")
        time.sleep(every)


@dataclass
class Cluster:
    net: Network
    hosts: dict[str, Host]
    urls: dict[str, str]  # gateway host -> base URL
    upstream_url: str
    dataset: str = ""
    patches: list[str] = field(default_factory=list)
    x: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def alive(self) -> list[Host]:
        """The hosts still running (a test may have killed one): a wait fails early when one of them exits."""
        return [h for h in self.hosts.values() if h.popen.poll() is None]

    def client(self, gateway: str, timeout: float = 60) -> Any:
        from clients.sdk import Client

        return Client(self.urls[gateway], ADMIN_KEY, timeout=timeout)

    def job(self, gateway: str, job_id: str) -> Any:
        with self.client(gateway) as c:
            return c.get_job(job_id)

    def worker_of(self, job: Any) -> str:
        """The worker host a job record names (its `worker` is host:pid; the pid must be that host's)."""
        host, _, pid = (job.worker or "").partition(":")
        assert host in self.hosts and self.hosts[host].pid == int(pid), f"job {job.id} names worker {job.worker}"
        return host


def _python(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clients", *args]


@pytest.fixture(scope="module")
def cluster(can_netns, tmp_path_factory, adult_model, adult) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("scaleout")
    model = tmp / "adult.onnx"
    model.write_bytes(adult_model.onnx_bytes)
    net = Network()
    hosts: dict[str, Host] = {}
    try:
        net.start()
        addr = {name: net.add_host(name) for name in ("redis", "upstream", "gateway-a", "gateway-b",
                                                      "worker-a", "worker-b")}
        base = {k: v for k, v in os.environ.items() if not k.startswith("FAIRPATCH_") and k != "REDIS_URL"}
        base |= {"PYTHONPATH": str(REPO), "FAIRPATCH_LOG_LEVEL": "info"}

        def start(name: str, cmd: list[str], **env: str) -> Host:
            hosts[name] = Host(name, net.argv(name, cmd), {**base, **env}, tmp)
            return hosts[name]

        start("redis", ["redis-server", "--bind", addr["redis"], "--port", str(REDIS_PORT), "--protected-mode",
                        "no", "--save", "", "--appendonly", "no", "--dir", str(tmp)])
        start("upstream", _python(["upstream", "--onnx", str(model), "--name", "adult", "--host", addr["upstream"],
                                   "--port", str(UPSTREAM_PORT)]))
        upstream = f"http://{addr['upstream']}:{UPSTREAM_PORT}"
        shared = {"FAIRPATCH_REDIS_URL": f"redis://{addr['redis']}:{REDIS_PORT}/0", "FAIRPATCH_ADMIN_KEY": ADMIN_KEY,
                  "FAIRPATCH_UPSTREAM_ALLOWLIST": upstream, "FAIRPATCH_WORKER_MAX_JOBS": "1",
                  "FAIRPATCH_JOB_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S)}
        urls = {}
        for gw in ("gateway-a", "gateway-b"):
            start(gw, _python(["serve"]), **shared, FAIRPATCH_HOST=addr[gw], FAIRPATCH_PORT=str(GATEWAY_PORT),
                  FAIRPATCH_DATA_DIR=str(tmp / gw))
            urls[gw] = f"http://{addr[gw]}:{GATEWAY_PORT}"
        for w in ("worker-a", "worker-b"):
            start(w, _python(["worker"]), **shared, FAIRPATCH_DATA_DIR=str(tmp / w))
        everyone = list(hosts.values())
        for gw, url in urls.items():
            wait_until(lambda u=url: _ready(u), f"{gw} did not get ready (Redis and its routes)", everyone)
        wait_until(lambda: _live(upstream), "the upstream did not answer", everyone)
        for w in ("worker-a", "worker-b"):
            wait_until(lambda h=hosts[w]: "worker ready" in h.text(), f"{w} did not start", everyone)
        yield Cluster(net, hosts, urls, upstream)
    finally:
        for h in reversed(list(hosts.values())):
            h.stop()
        net.close()


def _ready_body(url: str) -> dict | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def _get(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _ready(base: str) -> bool:
    return _get(f"{base}/v2/health/ready") == 200


def _live(base: str) -> bool:
    return _get(f"{base}/v2/health/live") == 200


@pytest.fixture(scope="module")
def trained(cluster, adult) -> Cluster:
    """The model registered and a dataset uploaded through gateway A; two jobs run at once with the upstream
    paused, so each worker (one job at a time) must hold one of them: the spread is forced, not hoped for."""
    import pandas as pd

    from clients.sdk import ModelSpec, UpstreamSpec

    rows = 3000
    tune = pd.DataFrame(adult.tune.X[:rows], columns=adult.feature_names)
    tune["income"] = adult.tune.y[:rows]
    tune["sex"] = [adult.group_names[g] for g in adult.tune.groups[:rows]]
    spec = ModelSpec(name="adult", version="1", groups=list(adult.group_names),
                     upstream=UpstreamSpec(url=cluster.upstream_url, model_name="adult", input_name="input",
                                           output_name="logits", timeout_s=300))  # outlasts the test's pauses
    with cluster.client("gateway-a") as a:
        a.register_model(spec)
        cluster.dataset = a.upload_dataset(tune, label="income", group="sex", name="tune").id
    cluster.x = np.asarray(adult.test.X[:32], dtype=np.float32)
    return cluster


def _submit(c: Cluster, gateway: str, seed: int) -> str:
    with c.client(gateway) as g:
        return g.create_job("adult", c.dataset, criterion="dp", query_budget=300, seed=seed,
                            options={"bias": "estimator"}).id


def _finished(c: Cluster, job_id: str) -> Any:
    job = c.job("gateway-b", job_id)
    return job if job.done else None


def test_jobs_spread_over_both_workers_and_name_the_worker_that_ran_them(trained):
    c = trained
    upstream = c.hosts["upstream"]
    upstream.signal(signal.SIGSTOP)  # fits block on their first query, so a worker stays busy with its job
    try:
        jobs = [_submit(c, "gateway-a", 0), _submit(c, "gateway-b", 1)]
        running = wait_until(lambda: all((j := c.job("gateway-a", i)).status == "running" and j.worker
                                         for i in jobs) and [c.job("gateway-a", i) for i in jobs],
                             "both jobs running at once", c.alive())
    finally:
        upstream.signal(signal.SIGCONT)
    ran_on = [c.worker_of(j) for j in running]
    assert sorted(ran_on) == ["worker-a", "worker-b"], ran_on  # one job each: neither worker takes two at once
    done = [wait_until(lambda i=i: _finished(c, i), f"job {i} to finish", c.alive()) for i in jobs]
    assert [d.status for d in done] == ["succeeded", "succeeded"], [d.error for d in done]
    assert [c.worker_of(d) for d in done] == ran_on
    c.patches = [d.result.patch_id for d in done]
    assert len(set(c.patches)) == 2  # two seeds, two patches
    for w in ("worker-a", "worker-b"):
        print(f"scale-out: {w} ran {ran_on.count(w)} of {len(jobs)} jobs")


def _patch_served(c: Cluster, gateway: str) -> str | None:
    with c.client(gateway) as g:
        return g.infer("adult", c.x).patch_id


def test_a_patch_activated_through_one_gateway_is_served_by_the_other(trained):
    c = trained
    assert len(c.patches) == 2, "needs the patches of the spread test"
    with c.client("gateway-a") as a, c.client("gateway-b") as b:
        assert b.infer("adult", c.x).patch_id is None  # B has seen the version before the activations
        times = []
        for i in range(20):
            want = c.patches[i % 2]
            t0 = time.monotonic()
            a.activate_patch("adult", want, version="1")
            wait_until(lambda w=want: b.infer("adult", c.x).patch_id == w,
                       f"gateway B to serve patch {want[:12]} activated through A", c.alive(),
                       every=0.005)
            times.append(time.monotonic() - t0)
        a.deactivate_patch("adult", version="1")
        wait_until(lambda: b.infer("adult", c.x).patch_id is None, "gateway B to serve unpatched again",
                   c.alive(), every=0.005)
    ms = [round(t * 1000) for t in times]  # the first two include B's first load of each patch from Redis
    print(f"scale-out: activation on A -> served by B: median {statistics.median(ms):.0f} ms, max {max(ms)} ms "
          f"over {len(ms)} activations (first load of each patch: {ms[0]}, {ms[1]} ms; then max {max(ms[2:])} ms)")


def test_with_redis_cut_off_the_gateways_serve_the_active_patch_from_memory(trained):
    c = trained
    assert c.patches, "needs the patches of the spread test"
    patch = c.patches[0]
    gateways = ["gateway-a", "gateway-b"]
    with c.client("gateway-a") as a:
        a.activate_patch("adult", patch, version="1")
    for gw in gateways:
        wait_until(lambda g=gw: _patch_served(c, g) == patch, f"{gw} to serve {patch[:12]}", c.alive())
    with c.client("gateway-a") as a:
        expected = a.infer("adult", c.x).scores
    logs = {gw: len(c.hosts[gw].text()) for gw in gateways}
    served, slowest = 0, 0.0
    clients = {gw: c.client(gw) for gw in gateways}
    c.net.link("redis", up=False)
    t_cut = time.monotonic()
    try:
        def outage_seen() -> bool:
            """Each gateway has found Redis gone on its own: a readiness probe, a registration re-read and a
            patch-pointer re-check each failed (so every cache it has was due for a refresh), while it served."""
            nonlocal served, slowest
            for gw in gateways:
                t0 = time.monotonic()
                r = clients[gw].infer("adult", c.x)
                slowest = max(slowest, time.monotonic() - t0)
                assert r.patch_id == patch, f"{gw} served {r.patch_id} during the outage"
                np.testing.assert_allclose(r.scores, expected, rtol=1e-6)
                served += 1
            return all(_ready_body(f"{c.urls[gw]}/v2/health/ready") == {"ready": True, "redis": False} and
                       "reloading ('adult'" in (tail := c.hosts[gw].text()[logs[gw]:]) and
                       "patch pointer re-check failed" in tail for gw in gateways)

        wait_until(outage_seen, "both gateways to notice Redis is gone", c.alive())
        outage = time.monotonic() - t_cut
    finally:
        c.net.link("redis", up=True)
        for g in clients.values():
            g.close()
    for gw in gateways:
        wait_until(lambda g=gw: _ready(c.urls[g]), f"{gw} to reach Redis again", c.alive())
        assert _patch_served(c, gw) == patch
    print(f"scale-out: Redis cut for {outage:.1f} s: {served} requests served patched, none refused, slowest "
          f"{slowest * 1000:.0f} ms; both gateways answered readiness 503 meanwhile")


def test_killing_a_worker_loses_no_job(trained):
    c = trained
    upstream = c.hosts["upstream"]
    upstream.signal(signal.SIGSTOP)  # the job is caught mid-fit
    try:
        job_id = _submit(c, "gateway-a", 2)
        job = wait_until(lambda: (j := c.job("gateway-a", job_id)).status == "running" and j.worker and j,
                         "the job to start", c.alive())
        victim = c.worker_of(job)
        c.hosts[victim].kill()  # SIGKILL: no chance to hand the job back
        killed_at = time.monotonic()
    finally:
        upstream.signal(signal.SIGCONT)
    done = wait_until(lambda: _finished(c, job_id), "the job to finish on the other worker", c.alive(),
                      timeout=WAIT_S + 3 * HEARTBEAT_S)
    took = time.monotonic() - killed_at
    assert done.status == "succeeded", done.error
    survivor = c.worker_of(done)
    assert survivor != victim
    with c.client("gateway-b") as b:
        statuses = {j.id: j.status for j in b.list_jobs()}
    assert set(statuses.values()) == {"succeeded"}, statuses  # every job submitted in this module ended well
    print(f"scale-out: job {job_id[:8]} started on {victim} (killed), finished on {survivor} {took:.1f} s after "
          f"the kill (heartbeat bound {HEARTBEAT_S:g} s)")


def test_killing_a_gateway_loses_no_request_the_client_retried(trained):
    from clients.sdk import FairpatchError

    c = trained
    patch = c.patches[0]
    order = ["gateway-a", "gateway-b"]
    clients = {gw: c.client(gw, timeout=30) for gw in order}
    total, kill_after = 60, 10
    answers: list[Any] = []
    failed: list[str] = []  # the gateway of every attempt that failed
    sender: threading.Thread | None = None
    try:
        expected = clients["gateway-b"].infer("adult", c.x)
        assert expected.patch_id == patch

        def send() -> None:  # round robin over both, as a Service would; a failed attempt goes to the next one
            for i in range(total):
                for attempt in range(len(order)):
                    gw = order[(i + attempt) % len(order)]
                    try:
                        answers.append(clients[gw].infer("adult", c.x))
                        break
                    except FairpatchError:
                        failed.append(gw)
                else:
                    return

        sender = threading.Thread(target=send)
        sender.start()
        wait_until(lambda: len(answers) >= kill_after, "the first requests", c.alive(), every=0.01)
        c.hosts["gateway-a"].kill()
    finally:
        if sender is not None:
            sender.join(WAIT_S)
        for g in clients.values():
            g.close()
    assert sender is not None and not sender.is_alive(), "the client hung"
    assert len(answers) == total, f"{total - len(answers)} requests lost; failed attempts: {failed}"
    assert all(r.patch_id == patch for r in answers)
    for r in answers:
        np.testing.assert_allclose(r.scores, expected.scores, rtol=1e-6)
    assert failed and set(failed) == {"gateway-a"}, failed  # A's attempts after the kill, retried on B
    print(f"scale-out: gateway A killed after {kill_after} of {total} requests: {total} served, "
          f"{len(failed)} attempts retried on B")


def test_names_are_cleaned_up_by_the_network_helper(can_netns):
    """The helper's finalizer leaves no namespace or link of its run behind, also when set-up stops half way."""
    net = Network()
    try:
        net.start()
        net.add_host("one")
        assert net.tag in sh("ip", "netns", "list")
    finally:
        net.close()
    assert net.tag not in sh("ip", "netns", "list")
    assert net.tag not in sh("ip", "link")
    assert re.search(rf"\b{net.client_link}\b", sh("ip", "link")) is None
