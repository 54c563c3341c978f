"""What the gateway costs: the same V2 requests straight to the upstream and through the gateway with an
Eraser patch active, side by side, at several concurrencies and batch sizes.

    python benchmarks/gateway_overhead.py [--requests 2000] [--seconds 8] [--markdown docs/benchmarks.md]

The upstream (`fairpatch upstream`, the biased Adult reference model) and the gateway (`fairpatch
serve`, embedded Redis) run as separate processes on loopback ports, so the load generator (one
connection per concurrent caller) does not share their event loop. The load generator is
`httpx.AsyncClient` or aiohttp (`--client`; default aiohttp when it is installed): httpx's async client
costs several times more CPU per request and its throughput falls as connections are added (on a
2-core machine, straight to the upstream: ~140 req/s at concurrency 64 against ~1,500 with aiohttp),
so with it the load generator, not the servers, sets the "direct" baseline. The patch
is fitted here with Eraser on the Adult tune split through a local oracle (1,000 queries), bound to
the model version, uploaded and activated through the management API. By default it is the group-free
variant (`bias=estimator`: the group is inferred from x by the patch), so both targets receive
byte-identical requests; `--bias group` sends the group as an extra input to the gateway instead.

Each cell runs `--requests` requests or `--seconds`, whichever ends first, after a short warm-up on
the same connections, split into `--rounds` rounds in which direct and gateway alternate, so load
from other processes on a shared machine falls on both alike. Latency is per request as the client
sees it (send to full response read); throughput is completed requests over the cell's wall time.
On a small machine the client, the upstream and the gateway compete for the same cores: read the
ratios, not the absolute figures.
Targets: added p50 <= 1 ms at concurrency 1; gateway throughput >= 70% of direct at concurrency 64.

The gateway is measured with two upstream legs, in the same alternating rounds: `gateway` sends the
upstream JSON (the caller's bytes as they came, when nothing in them changes), `gateway-binary` the same
model registered with `binary_data` (tensors to and from the upstream as binary data, the V2 binary
tensor extension Triton speaks): the gateway still reads the caller's JSON, but the upstream no longer
parses it. `--legs` picks. The upstream's CPU per request is recorded in every round, so the table
shows what each leg costs the upstream as well as the gateway.

`--live-off` also starts a second gateway with live fairness off (`FAIRPATCH_LIVE_FAIRNESS=false`) and measures
it in the same rounds: every request then carries its group and a fresh request id (so the gateway with live
fairness on counts it by group and remembers it for feedback), and a table sets the two gateways' CPU per request
side by side. Target: live fairness costs at most 10% more gateway CPU per request.
`--observability` is the issue's figure for both together: a second gateway of this checkout with metrics AND live
fairness off (`FAIRPATCH_METRICS=false`, `FAIRPATCH_LIVE_FAIRNESS=false`) in front of the same upstream, with the
same patch, measured in the same alternating rounds as `unobserved`, against the gateway with both on (the
default). As with `--live-off`, every request to either gateway carries its rows' groups and a fresh request id,
so live fairness really counts it (the run ends by reading the gateway's live row count back). The table beside
the main one gives the gateway's CPU per request (from /proc) with both on against both off, cell by cell and over
all cells (target: at most 110%). Use `--legs json`: only the JSON leg has an `unobserved` twin.
Payload logging is off in every gateway here (`FAIRPATCH_PAYLOAD_LOG_URL` is dropped from the environment).

`--targets direct,bare,patched-floor,nginx,kserve,zero-hop,gateway` measures the peers a user would pick in the same
alternating rounds (benchmarks/overhead_targets.py): nginx (Debian's package, one worker, keep-alive to the upstream)
as the compiled floor, `bare` (the `--floor` proxy) as the Python floor, KServe's Python transformer with identity
pre/post-processing (its own virtualenv, tests/peer_envs.py), and the zero-hop path: the patch exported into the
model (`fairpatch patches export ... --out`) served by `fairpatch upstream`, against the plain model served alike
(direct). `patched-floor` is the bare proxy applying the patch with nothing else (benchmarks/bare_proxy.py --patch):
the least any Python gateway serving this patch costs, the floor under the gateway's CPU target. Every target answers
the same first test rows before the rounds (zero-hop and the patched floor as the gateway, to float32 rounding; the
proxies as direct, exactly), and a table gives each target's CPU per request summed over its processes (nginx's
master and worker; the gateway with its embedded Redis and job worker). A target that cannot run here is skipped with
the reason. `--smoke` runs a few requests per cell (the test's mode); `--json FILE` keeps every cell.

`--baseline DIR` also starts the gateway of another checkout (an earlier commit, say) in front of the same
upstream, with the same patch, and measures it in the same alternating rounds as a third target: a
before/after comparison under the same load, which separate runs on a shared machine cannot give.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydantic_core

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.overhead_targets import (  # noqa: E402
    PEERS,
    TargetUnavailable,
    export_zero_hop,
    kserve_command,
    nginx_command,
    parse_targets,
    peers_markdown,
    print_peers,
    process_tree,
)
from clients.sdk import Client, FairpatchError, ModelSpec, UpstreamSpec  # noqa: E402

MODEL = "adult"
LEGS = {"gateway": ("json", MODEL), "gateway-binary": ("binary", "adult-binary")}  # target: (leg, model name)
START, END = "<!-- gateway_overhead:start -->", "<!-- gateway_overhead:end -->"


@dataclass
class Cell:
    target: str
    concurrency: int
    batch: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    cpu_s: float = float("nan")  # CPU time of the server answering (upstream direct, gateway through it)
    upstream_cpu_s: float = float("nan")  # the upstream's CPU time in the same rounds
    own_cpu_s: float = float("nan")  # CPU time of the target's whole process tree (--targets)

    @property
    def cpu_ms(self) -> float:
        """The answering server's own CPU per completed request (steadier than latency on a shared machine)."""
        return 1000 * self.cpu_s / self.requests if self.requests else float("nan")

    @property
    def upstream_cpu_ms(self) -> float:
        return 1000 * self.upstream_cpu_s / self.requests if self.requests else float("nan")

    @property
    def own_cpu_ms(self) -> float:
        """CPU per request summed over the target's processes (nginx's master and worker, the gateway's Redis)."""
        return 1000 * self.own_cpu_s / self.requests if self.requests else float("nan")

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50)) if len(self.latencies_ms) else float("nan")

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if len(self.latencies_ms) else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# --- processes ---------------------------------------------------------------------------------------

# Under --profile: the main thread's CPU clock, not the wall clock (a write that wakes the peer process often
# hands it the core, and wall time would charge that wait to the write). `python -m cProfile` would write nothing:
# uvicorn re-raises SIGTERM after its graceful shutdown and the default handler ends the process first; a handler
# installed beforehand turns it into SystemExit, so the stats are written.
PROFILED = ("import cProfile, signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
            "from clients.cli import main; sys.argv = ['fairpatch'] + sys.argv[1:]; "
            "p = cProfile.Profile(time.thread_time); p.enable()\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nfinally:\n    p.disable(); p.dump_stats({out!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f}s")


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fit_patch(bias: str, queries: int, seed: int):
    """The reference model, an Eraser patch fitted on the tune split, and the test split to send."""
    from patcher.datasets import load_dataset
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData

    data = load_dataset("adult", "sex")
    model = reference_model("adult", "sex", seed=seed, data=data)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    patch = get_method("eraser").run(OnnxOracle(model.onnx_bytes, budget=queries), tune,
                                     FitRequest("dp", queries, seed), {"bias": bias}).patch
    return model, patch.for_model(MODEL, "1"), data


def cpu_seconds(pid: int | tuple[int, ...] | None) -> float:
    """User + system CPU seconds of a process so far (nan where there is none); of a tuple, the sum."""
    if isinstance(pid, tuple):
        return sum(cpu_seconds(p) for p in pid) if pid else float("nan")
    if pid is not None:
        # The process's CPU clock, in ns (Linux's clock id for a pid, as clock_getcpuclockid(3) makes it):
        # /proc's utime and stime count 10 ms ticks, too coarse for nginx or for a smoke run's few requests.
        with contextlib.suppress(OSError, OverflowError):
            return time.clock_gettime((~pid << 3) | 2)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# --- load --------------------------------------------------------------------------------------------

KEEPALIVE_S = 3.0  # the load's idle connections are closed before uvicorn's 5 s keep-alive timeout closes them

def v2_body(X: np.ndarray, groups: list[str] | None, with_id: bool = False) -> bytes:
    inputs = [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]
    if groups is not None:
        inputs.append({"name": "group", "shape": [len(groups)], "datatype": "BYTES", "data": groups})
    body = pydantic_core.to_json({"inputs": inputs})
    return b"{" + ID_SLOT + b"," + body[1:] if with_id else body


ID_SLOT = b'"id":"r0000000000"'  # a body holding it gets a fresh request id per request (--live-off)


class Bodies:
    """The request body, with a fresh id in ID_SLOT per request when it has one (the same length every time)."""

    def __init__(self, body: bytes) -> None:
        self.parts = body.split(ID_SLOT, 1) if ID_SLOT in body else None
        self.body, self.n = body, 0

    def next(self) -> bytes:
        if self.parts is None:
            return self.body
        self.n += 1
        return b'%s"id":"r%010d"%s' % (self.parts[0], self.n, self.parts[1])


class HttpxLoad:
    """One httpx.AsyncClient with a connection per concurrent caller."""

    def __init__(self, url: str, path: str, body: bytes, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                              keepalive_expiry=KEEPALIVE_S)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=30)
        self.path, self.body, self.headers = path, Bodies(body), {"content-type": "application/json"}

    async def __call__(self) -> bool:
        try:
            r = await self.client.post(self.path, content=self.body.next(), headers=self.headers)
        except httpx.HTTPError:  # counted as an error, like a non-200 answer
            return False
        return r.status_code == 200

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpLoad:
    """The same with aiohttp, whose client costs a fraction of httpx's per request (see the module doc)."""

    def __init__(self, url: str, path: str, body: bytes, concurrency: int) -> None:
        import aiohttp

        self._errors = (aiohttp.ClientError, TimeoutError)
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends them: while the other targets take
        # their turn a connection can sit idle that long, and reusing one the server is closing fails.
        connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30))
        self.path, self.body, self.headers = path, Bodies(body), {"content-type": "application/json"}

    async def __call__(self) -> bool:
        try:
            async with self.session.post(self.path, data=self.body.next(), headers=self.headers) as r:
                await r.read()
                return r.status == 200
        except self._errors:  # counted as an error, like a non-200 answer
            return False

    async def aclose(self) -> None:
        await self.session.close()


LOADERS = {"httpx": HttpxLoad, "aiohttp": AiohttpLoad}


async def _segment(load, concurrency: int, requests: int, seconds: float) -> tuple[list[float], int, float]:
    """`concurrency` callers sending requests until `requests` are sent or `seconds` are up."""
    latencies: list[float] = []
    errors = sent = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal sent, errors
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            t0 = time.perf_counter()
            ok = await load()
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


async def run_pair(client: str, urls: dict[str, str], paths: dict[str, str], bodies: dict[str, bytes],
                   concurrency: int, batch: int, requests: int, seconds: float, warmup: int, rounds: int,
                   pids: dict[str, int | None] | None = None, upstream_pid: int | None = None,
                   trees: dict[str, tuple[int, ...]] | None = None) -> list[Cell]:
    """Direct and gateway cells for one (batch, concurrency), measured in alternating rounds: on a shared
    machine the load from other processes drifts, and alternating spreads it over every target alike.
    `pids`: the process answering each target, whose CPU time per request is recorded (and the upstream's);
    `trees`: each target's processes, whose summed CPU time is recorded too."""
    pids, trees = pids or {}, trees or {}
    loads = {t: LOADERS[client](urls[t], paths[t], bodies[t], concurrency) for t in urls}
    try:
        for load in loads.values():  # warm-up: open every connection, fill caches
            await asyncio.gather(*(load() for _ in range(max(warmup, concurrency))))
        totals = {t: ([], 0, 0.0, 0.0, 0.0, 0.0) for t in loads}
        for r in range(rounds):
            for target in (list(loads) if r % 2 == 0 else list(loads)[::-1]):
                cpu0, up0 = cpu_seconds(pids.get(target)), cpu_seconds(upstream_pid)
                own0 = cpu_seconds(trees.get(target))
                lat, err, wall = await _segment(loads[target], concurrency, max(1, requests // rounds),
                                                seconds / rounds)
                cpu, up = cpu_seconds(pids.get(target)) - cpu0, cpu_seconds(upstream_pid) - up0
                own = cpu_seconds(trees.get(target)) - own0
                done = totals[target]
                totals[target] = (done[0] + lat, done[1] + err, done[2] + wall, done[3] + cpu, done[4] + up,
                                  done[5] + own)
    finally:
        for load in loads.values():
            await load.aclose()
    return [Cell(t, concurrency, batch, len(lat), err, wall, np.asarray(lat), cpu, up, own)
            for t, (lat, err, wall, cpu, up, own) in totals.items()]


# --- report ------------------------------------------------------------------------------------------

def rows(cells: list[Cell]) -> list[list[str]]:
    out = []
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    for (target, conc, batch), g in by.items():
        if target not in LEGS:
            continue
        d = by[("direct", conc, batch)]
        out.append([str(batch), str(conc), LEGS[target][0], f"{d.p50:.2f}", f"{g.p50:.2f}", f"{g.p50 - d.p50:+.2f}",
                    f"{d.p99:.2f}", f"{g.p99:.2f}", f"{d.rps:,.0f}", f"{g.rps:,.0f}", f"{g.rps / d.rps:.0%}",
                    f"{d.cpu_ms:.2f}", f"{g.upstream_cpu_ms:.2f}", f"{g.cpu_ms:.2f}", f"{d.requests}/{g.requests}",
                    str(d.errors + g.errors)])
    return sorted(out, key=lambda r: (int(r[0]), int(r[1])))


HEAD = ["batch", "conc.", "upstream leg", "p50 direct ms", "p50 gateway ms", "added p50 ms", "p99 direct ms",
        "p99 gateway ms", "req/s direct", "req/s gateway", "gateway/direct", "CPU ms/req upstream (direct)",
        "CPU ms/req upstream (via gateway)", "CPU ms/req gateway", "requests (d/g)", "errors"]


def verdict(cells: list[Cell]) -> list[str]:
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    lines = []
    for target, (leg, _) in LEGS.items():
        for batch in sorted({c.batch for c in cells}):
            if (target, 1, batch) in by:
                added = by[(target, 1, batch)].p50 - by[("direct", 1, batch)].p50
                lines.append(f"{leg} upstream leg, batch {batch}, concurrency 1: added p50 {added:.2f} ms "
                             f"(target <= 1 ms): {'met' if added <= 1.0 else 'NOT met'}")
            if (target, 64, batch) in by:
                ratio = by[(target, 64, batch)].rps / by[("direct", 64, batch)].rps
                lines.append(f"{leg} upstream leg, batch {batch}, concurrency 64: throughput {ratio:.0%} of direct "
                             f"(target >= 70%): {'met' if ratio >= 0.7 else 'NOT met'}")
    return lines


BASE_HEAD = ["batch", "conc.", "p50 baseline ms", "p50 gateway ms", "req/s baseline", "req/s gateway",
             "CPU ms/req baseline", "CPU ms/req gateway", "CPU gateway/baseline", "errors (b/g)"]


def baseline_rows(cells: list[Cell]) -> list[list[str]]:
    """The gateway against the baseline gateway (`--baseline`), cell by cell."""
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    out = []
    for (target, conc, batch), b in by.items():
        if target != "baseline":
            continue
        g = by.get(("gateway", conc, batch))
        if g is None:  # the JSON leg was not measured
            continue
        out.append([str(batch), str(conc), f"{b.p50:.2f}", f"{g.p50:.2f}", f"{b.rps:,.0f}", f"{g.rps:,.0f}",
                    f"{b.cpu_ms:.2f}", f"{g.cpu_ms:.2f}", f"{g.cpu_ms / b.cpu_ms:.0%}", f"{b.errors}/{g.errors}"])
    return out


OBS_HEAD = ["batch", "conc.", "p50 off ms", "p50 on ms", "req/s off", "req/s on", "CPU ms/req off",
            "CPU ms/req on", "CPU on/off", "errors (off/on)"]
# What the unobserved gateway turns off: the metrics, and live fairness where the gateway has it (an unknown
# setting is ignored by the gateway's settings, so naming it here is harmless before it lands).
OBSERVABILITY_OFF = {"FAIRPATCH_METRICS": "false", "FAIRPATCH_LIVE_FAIRNESS": "false"}


def observability_rows(cells: list[Cell]) -> list[list[str]]:
    """The gateway (metrics + live fairness on) against the same gateway with both off (`--observability`)."""
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    out = []
    for (target, conc, batch), off in by.items():
        on = by.get(("gateway", conc, batch))
        if target != "unobserved" or on is None:
            continue
        out.append([str(batch), str(conc), f"{off.p50:.2f}", f"{on.p50:.2f}", f"{off.rps:,.0f}", f"{on.rps:,.0f}",
                    f"{off.cpu_ms:.3f}", f"{on.cpu_ms:.3f}", f"{on.cpu_ms / off.cpu_ms:.1%}",
                    f"{off.errors}/{on.errors}"])
    return sorted(out, key=lambda r: (int(r[0]), int(r[1])))


def observability_verdict(cells: list[Cell]) -> str:
    """All cells' CPU together: on/off of the summed CPU per request (each cell weighs alike)."""
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    pairs = [(by[("gateway", k[1], k[2])], c) for k, c in by.items() if k[0] == "unobserved" and
             ("gateway", k[1], k[2]) in by]
    ratio = sum(on.cpu_ms for on, _ in pairs) / sum(off.cpu_ms for _, off in pairs)
    spread = [on.cpu_ms / off.cpu_ms for on, off in pairs]
    return (f"metrics + live fairness on: {ratio:.1%} of the gateway's CPU per request with both off, "
            f"over {len(pairs)} cells "
            f"(cells from {min(spread):.1%} to {max(spread):.1%}; target <= 110%): "
            f"{'met' if ratio <= 1.10 else 'NOT met'}")


FLOOR_HEAD = ["batch", "conc.", "p50 direct ms", "added p50 floor ms", "added p50 gateway ms (json / binary leg)",
              "floor/direct throughput", "gateway/direct throughput (json / binary leg)", "CPU ms/req floor",
              "CPU ms/req gateway (json / binary leg)", "errors floor"]


def floor_rows(cells: list[Cell]) -> list[list[str]]:
    """The pass-through proxy (`--floor`) beside the gateway's legs, cell by cell."""
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    out = []
    for (target, conc, batch), f in by.items():
        if target != "floor":
            continue
        d = by[("direct", conc, batch)]
        legs = [g for t in LEGS if (g := by.get((t, conc, batch))) is not None]
        out.append([str(batch), str(conc), f"{d.p50:.2f}", f"{f.p50 - d.p50:+.2f}",
                    " / ".join(f"{g.p50 - d.p50:+.2f}" for g in legs), f"{f.rps / d.rps:.0%}",
                    " / ".join(f"{g.rps / d.rps:.0%}" for g in legs), f"{f.cpu_ms:.2f}",
                    " / ".join(f"{g.cpu_ms:.2f}" for g in legs), str(f.errors)])
    return sorted(out, key=lambda r: (int(r[0]), int(r[1])))


LIVE_HEAD = ["batch", "conc.", "p50 live off ms", "p50 live on ms", "req/s live off", "req/s live on",
             "CPU ms/req live off", "CPU ms/req live on", "CPU on/off", "errors (off/on)"]


def live_rows(cells: list[Cell]) -> list[list[str]]:
    """The gateway (live fairness on) against the same gateway with it off (`--live-off`), cell by cell."""
    by = {(c.target, c.concurrency, c.batch): c for c in cells}
    out = []
    for (target, conc, batch), off in by.items():
        on = by.get(("gateway", conc, batch))
        if target != "live-off" or on is None:
            continue
        out.append([str(batch), str(conc), f"{off.p50:.2f}", f"{on.p50:.2f}", f"{off.rps:,.0f}", f"{on.rps:,.0f}",
                    f"{off.cpu_ms:.3f}", f"{on.cpu_ms:.3f}", f"{on.cpu_ms / off.cpu_ms:.1%}",
                    f"{off.errors}/{on.errors}"])
    return sorted(out, key=lambda r: (int(r[0]), int(r[1])))


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in body)]


def markdown(cells: list[Cell], setup: str, baseline: str | None = None, extra: str = "") -> str:
    lines = [START, "## Gateway overhead", "", setup, "", *_table(HEAD, rows(cells))]
    lines += ["", *(f"- {v}" for v in verdict(cells))]
    if baseline:
        lines += ["", f"Against the baseline gateway ({baseline}), same rounds:", "",
                  *_table(BASE_HEAD, baseline_rows(cells))]
    if any(c.target == "live-off" for c in cells):
        lines += ["", "Live fairness on (the gateway above: every request with its group and a fresh id) against "
                  "the same gateway with it off (`FAIRPATCH_LIVE_FAIRNESS=false`), same rounds (target: at most 10% "
                  "more CPU per request):", "", *_table(LIVE_HEAD, live_rows(cells))]
    if any(c.target == "unobserved" for c in cells):
        lines += ["", "Observability's cost: the gateway above (metrics and live fairness on, every request with its "
                  "groups and a fresh id) against the same gateway with both off (`FAIRPATCH_METRICS=false`, "
                  "`FAIRPATCH_LIVE_FAIRNESS=false`), same rounds, JSON leg:", "",
                  *_table(OBS_HEAD, observability_rows(cells)), "",
                  f"- {observability_verdict(cells)}"]
    if any(c.target == "floor" for c in cells):
        lines += ["", "The floor: a pass-through proxy on the same stack (benchmarks/bare_proxy.py: uvicorn + aiohttp, "
                  "no parsing, no patch), same rounds:", "", *_table(FLOOR_HEAD, floor_rows(cells))]
    if extra:
        lines += ["", extra.rstrip("\n")]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n?", lambda _m: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def print_table(cells: list[Cell], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in HEAD:
        table.add_column(h, justify="right")
    for r in rows(cells):
        table.add_row(*r)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or a log gets the whole table
    console.print(table)
    for v in verdict(cells):
        console.print(v)
    if any(c.target == "floor" for c in cells):
        floor = Table(title="the floor: a pass-through proxy on the same stack (uvicorn + aiohttp)")
        for h in FLOOR_HEAD:
            floor.add_column(h, justify="right")
        for r in floor_rows(cells):
            floor.add_row(*r)
        console.print(floor)
    if any(c.target == "live-off" for c in cells):
        live = Table(title="live fairness on (gateway) against off (live-off): target at most 10% more CPU per request")
        for h in LIVE_HEAD:
            live.add_column(h, justify="right")
        for r in live_rows(cells):
            live.add_row(*r)
        console.print(live)
    if any(c.target == "unobserved" for c in cells):
        obs = Table(title="observability's cost: the gateway with metrics + live fairness on against both off")
        for h in OBS_HEAD:
            obs.add_column(h, justify="right")
        for r in observability_rows(cells):
            obs.add_row(*r)
        console.print(obs)
        console.print(observability_verdict(cells))
    if any(c.target == "baseline" for c in cells):
        base = Table(title="the gateway against the baseline gateway")
        for h in BASE_HEAD:
            base.add_column(h, justify="right")
        for r in baseline_rows(cells):
            base.add_row(*r)
        console.print(base)


def live_rows_counted(url: str, timeout: float = 10.0) -> int:
    """Rows the gateway's live fairness holds for the model, all arms (it flushes every second: wait for it);
    -1 when live fairness is off there (FAIRPATCH_LIVE_FAIRNESS=false in the benchmark's own environment)."""
    deadline = time.monotonic() + timeout
    with Client(url, "bench") as fp:
        while True:
            try:
                rows = sum(arm["rows"] for arm in fp.fairness(MODEL)["arms"])
            except FairpatchError as e:
                if e.status == 409:
                    return -1
                raise
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


# --- the peers (--targets) ------------------------------------------------------------------------------

CHECK_ROWS = 16  # test rows every target answers before the rounds: the answers check
ANSWER_TOLERANCE = 1e-5  # the export's answers agree with the gateway's to float32 rounding (docs/export.md)


def start_peers(chosen: list[str], stack: contextlib.ExitStack, tmp: Path, env: dict[str, str], up_port: int,
                patch, onnx: Path) -> tuple[dict[str, tuple[subprocess.Popen, str]], dict[str, str]]:
    """nginx, the KServe transformer and the zero-hop upstream, those chosen; each that cannot start here is
    skipped with the reason, printed and returned."""
    started: dict[str, tuple[subprocess.Popen, str]] = {}
    skipped: dict[str, str] = {}
    for peer in (p for p in PEERS if p in chosen):
        port = free_port()
        try:
            if peer == "nginx":
                cmd, peer_env = nginx_command(tmp / "nginx", port, up_port), env
            elif peer == "kserve":
                cmd, peer_env = kserve_command(port, up_port, MODEL, env)
            elif peer == "patched-floor":
                if patch.group_at_inference:
                    raise TargetUnavailable("the patched floor serves patches that need no group at inference; "
                                            "this one reads it (use --bias estimator)")
                patch_file = tmp / "patch.fpatch"
                patch_file.write_bytes(patch.to_bytes())
                cmd, peer_env = [sys.executable, str(REPO / "benchmarks" / "bare_proxy.py"), "--upstream",
                                 f"http://127.0.0.1:{up_port}", "--port", str(port), "--patch", str(patch_file)], env
            else:
                patch_file = tmp / "patch.fpatch"
                patch_file.write_bytes(patch.to_bytes())
                patched = export_zero_hop(patch_file, onnx, tmp / "adult-patched.onnx", env)
                cmd, peer_env = [sys.executable, "-m", "clients", "upstream", "--onnx", str(patched), "--name", MODEL,
                                 "--port", str(port), "--log-level", "warning"], env
        except TargetUnavailable as e:
            skipped[peer] = str(e)
            print(f"{peer}: skipped: {e}", flush=True)
            continue
        proc = start(cmd, peer_env, tmp / f"{peer}.log")
        stack.callback(stop, proc)
        started[peer] = (proc, f"http://127.0.0.1:{port}")
    return started, skipped


def ready_peers(started: dict[str, tuple[subprocess.Popen, str]], skipped: dict[str, str],
                tmp: Path) -> dict[str, tuple[subprocess.Popen, str]]:
    """The peers that came up; one that did not is stopped and skipped with its log's end as the reason."""
    ready = {}
    for peer, (proc, url) in started.items():
        try:
            wait_ready(url, proc)
        except RuntimeError as e:
            stop(proc)
            log = tmp / f"{peer}.log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            skipped[peer] = f"{e}; the end of its log: {tail.strip()}"
            print(f"{peer}: skipped: {skipped[peer]}", flush=True)
            continue
        ready[peer] = (proc, url)
    return ready


def zero_hop_body(X: np.ndarray, group_ids: np.ndarray, patch) -> bytes:
    """What the exported model takes: the features, plus the group ids (INT64) where the patch needs the group."""
    body = v2_body(X, None)
    if not patch.group_at_inference:
        return body
    group = {"name": "group", "shape": [len(X)], "datatype": "INT64", "data": [int(g) for g in group_ids]}
    return body[:-2] + b"," + pydantic_core.to_json(group) + b"]}"


def target_answers(targets: dict[str, str], paths: dict[str, str], data, patch) -> dict[str, list[float]]:
    """Every target's scores for the first CHECK_ROWS test rows (the first output's data)."""
    X, ids = data.test.X[:CHECK_ROWS], data.test.groups[:CHECK_ROWS]
    names = [data.group_names[g] for g in ids]
    out = {}
    with httpx.Client(timeout=30) as client:
        for target, url in targets.items():
            if target == "zero-hop":
                body = zero_hop_body(X, ids, patch)
            elif target in LEGS or target in ("baseline", "live-off", "unobserved"):
                body = v2_body(X, names if patch.group_at_inference else None)
            else:
                body = v2_body(X, None)
            r = client.post(url + paths[target], content=body, headers={"content-type": "application/json"})
            r.raise_for_status()
            out[target] = [float(v) for v in r.json()["outputs"][0]["data"]]
    if ("zero-hop" in out or "patched-floor" in out) and "direct" in out and not any(t in out for t in LEGS):
        out["gateway, offline"] = offline_patched(patch, X, ids, out["direct"])
    return out


def offline_patched(patch, X: np.ndarray, group_ids: np.ndarray, direct: list[float]) -> list[float]:
    """What the gateway would answer for these rows, by its own function (service.infer.apply_patch) on direct's
    scores: what zero-hop is checked against when no gateway leg is measured. The patch here has no input
    transform (an output transform on the upstream's logits)."""
    from patcher.apply import PatchRunner
    from service.infer import apply_patch
    from service.registry import ModelSpec, UpstreamSpec

    spec = ModelSpec(name="adult", upstream=UpstreamSpec(url="http://127.0.0.1:9", output_kind="logits"))
    scores = np.asarray(direct, np.float32).reshape(len(X), -1)
    return [float(v) for v in apply_patch(PatchRunner(patch), spec, X, scores, group_ids).ravel()]


def answers_problem(answers: dict[str, list[float]]) -> str | None:
    """Why the answers disagree, or None: zero-hop must answer what the gateway's legs answer (to float32
    rounding), the proxies exactly what the upstream answers."""
    def diff(a: str, b: str) -> float:
        return float(np.max(np.abs(np.asarray(answers[a]) - np.asarray(answers[b]))))

    for leg in (t for t in (*LEGS, "gateway, offline") if t in answers):
        for patched in ("zero-hop", "patched-floor"):
            if patched in answers and diff(patched, leg) > ANSWER_TOLERANCE:
                return f"{patched} and {leg} answers differ by up to {diff(patched, leg):.2e} on {CHECK_ROWS} rows"
    for proxy in ("floor", "nginx", "kserve"):
        if proxy in answers and diff(proxy, "direct") > 0:
            return f"{proxy} answers differ from direct by up to {diff(proxy, 'direct'):.2e}"
    return None


def write_json(path: Path, cells: list[Cell], skipped: dict[str, str], answers: dict[str, list[float]],
               argv: list[str]) -> None:
    import json

    rows = [{"target": c.target, "batch": c.batch, "concurrency": c.concurrency, "requests": c.requests,
             "errors": c.errors, "seconds": c.seconds, "p50_ms": c.p50, "p99_ms": c.p99, "rps": c.rps,
             "cpu_ms": c.cpu_ms, "own_cpu_ms": c.own_cpu_ms, "upstream_cpu_ms": c.upstream_cpu_ms} for c in cells]
    path.write_text(json.dumps({"argv": argv, "cells": rows, "skipped": skipped, "answers": answers}, indent=1))


# --- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per cell at most (default: 2000)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per cell at most (default: 8)")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up requests per cell (default: 50)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="each cell's requests and seconds are split into this many rounds, direct and gateway "
                         "alternating (default: 4)")
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated (default: 1,16,64)")
    ap.add_argument("--batch", default="1,64", help="rows per request, comma-separated (default: 1,64)")
    ap.add_argument("--bias", default="estimator", choices=["estimator", "group"],
                    help="Eraser variant: estimator (no group at inference) or group (sent as an input)")
    ap.add_argument("--queries", type=int, default=1000, help="Eraser query budget (default: 1000)")
    ap.add_argument("--legs", default="json,binary",
                    help="upstream legs to measure through the gateway: json, binary or both (default: json,binary)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--client", default="auto", choices=["auto", "httpx", "aiohttp"],
                    help="load generator: httpx.AsyncClient, or aiohttp (auto: aiohttp when installed)")
    ap.add_argument("--markdown", type=Path, help="write (or replace) the '## Gateway overhead' section of FILE")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also measure the gateway of the checkout in DIR (e.g. `git worktree add DIR <commit>`) "
                         "in the same rounds, against the same upstream")
    ap.add_argument("--profile", type=Path, default=None, metavar="FILE",
                    help="run the gateway under cProfile and write its stats to FILE when it stops (read them with "
                         "`python -m pstats FILE`); the profiler slows the gateway, so its figures are not the "
                         "gateway's own")
    ap.add_argument("--floor", action="store_true",
                    help="also measure a pass-through proxy on the gateway's stack (benchmarks/bare_proxy.py: "
                         "uvicorn + aiohttp, no parsing, no patch) in the same rounds: what any proxy built from "
                         "these parts adds on this machine")
    ap.add_argument("--live-off", action="store_true",
                    help="also measure the gateway with live fairness off, in the same rounds; requests then carry "
                         "their group and a fresh id each (what live fairness records)")
    ap.add_argument("--observability", action="store_true",
                    help="also measure this gateway with metrics and live fairness off, in the same rounds: the CPU "
                         "both cost per request; requests then carry their group and a fresh id each (use --legs json)")
    ap.add_argument("--baseline-label", default=None, help="how the report names the baseline (default: DIR)")
    ap.add_argument("--targets", default=None,
                    help="the targets to measure, comma-separated, from direct,bare,patched-floor,nginx,kserve,"
                         "zero-hop,gateway "
                         "(bare: --floor's proxy; gateway: the legs of --legs). With it, a side-by-side table of every "
                         "target's CPU per request (summed over its processes) is added; a target that cannot run "
                         "here is skipped with the reason (default: direct, the gateway and, with --floor, bare)")
    ap.add_argument("--json", type=Path, metavar="FILE",
                    help="also write every cell, the skipped targets and the answers check as JSON to FILE")
    ap.add_argument("--smoke", action="store_true",
                    help="a few requests per cell (batch 1 and 8, concurrency 1 and 2, 300 Eraser queries): checks "
                         "that every target runs and answers, measures nothing worth reading")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.rounds, args.warmup, args.queries = 12, 2, 2, 300
        args.concurrency, args.batch = "1,2", "1,8"
    chosen: list[str] | None = None
    if args.targets is not None:
        try:
            chosen = parse_targets(args.targets)
        except ValueError as e:
            ap.error(f"--targets: {e}")
        args.floor = args.floor or "bare" in chosen
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.client == "auto":
        try:
            import aiohttp  # noqa: F401

            args.client = "aiohttp"
        except ImportError:
            args.client = "httpx"
    batches = [int(b) for b in args.batch.split(",")]
    legs = [t for t, (leg, _) in LEGS.items() if leg in args.legs.split(",")]
    if not legs:
        ap.error("--legs: give json, binary or both")
    if chosen is not None and "gateway" not in chosen:
        legs = []  # the gateway still starts (the other options lean on it), but is not measured

    live_load = args.live_off or args.observability  # requests carry groups and fresh ids (what live counts)
    print(f"fitting the Eraser patch (bias={args.bias}, {args.queries} queries) ...", flush=True)
    model, patch, data = fit_patch(args.bias, args.queries, args.seed)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp-overhead-")))
        onnx = model.save(tmp / "adult.onnx")
        env = {**os.environ, "FAIRPATCH_DATA_DIR": str(tmp / "data"), "FAIRPATCH_LOG_LEVEL": "warning",
               "FAIRPATCH_ADMIN_KEY": "bench", "PYTHONUNBUFFERED": "1"}
        env.pop("FAIRPATCH_REDIS_URL", None)
        env.pop("FAIRPATCH_PAYLOAD_LOG_URL", None)  # payload logging off everywhere: not what is measured here
        env.pop("REDIS_URL", None)
        up_port, gw_port = free_port(), free_port()
        exe = [sys.executable, "-m", "clients"]
        upstream = start([*exe, "upstream", "--onnx", str(onnx), "--name", MODEL, "--port", str(up_port),
                          "--log-level", "warning"], env, tmp / "upstream.log")
        stack.callback(stop, upstream)
        profiled = [sys.executable, "-c", PROFILED.format(out=str(args.profile.resolve()))] if args.profile else exe
        gateways = {"gateway": start([*profiled, "serve", "--port", str(gw_port)], env, tmp / "gateway.log")}
        stack.callback(stop, gateways["gateway"])
        urls = {"direct": f"http://127.0.0.1:{up_port}", "gateway": f"http://127.0.0.1:{gw_port}"}
        if args.baseline:  # its own data dir (embedded Redis) and its own code: DIR first on its path
            base_env = {**env, "FAIRPATCH_DATA_DIR": str(tmp / "baseline-data"),
                        "PYTHONPATH": os.pathsep.join([str(args.baseline.resolve()), env.get("PYTHONPATH", "")])}
            base_port = free_port()
            gateways["baseline"] = start([*exe, "serve", "--port", str(base_port)], base_env, tmp / "baseline.log",
                                         cwd=args.baseline.resolve())
            stack.callback(stop, gateways["baseline"])
            urls["baseline"] = f"http://127.0.0.1:{base_port}"
        if args.live_off:  # the same code, live fairness off, its own embedded Redis
            off_port = free_port()
            gateways["live-off"] = start([*exe, "serve", "--port", str(off_port)],
                                         {**env, "FAIRPATCH_DATA_DIR": str(tmp / "off-data"),
                                          "FAIRPATCH_LIVE_FAIRNESS": "false"}, tmp / "live-off.log")
            stack.callback(stop, gateways["live-off"])
            urls["live-off"] = f"http://127.0.0.1:{off_port}"
        if args.observability:
            off_env = {**env, "FAIRPATCH_DATA_DIR": str(tmp / "unobserved-data"), **OBSERVABILITY_OFF}
            off_port = free_port()
            gateways["unobserved"] = start([*exe, "serve", "--port", str(off_port)], off_env, tmp / "unobserved.log")
            stack.callback(stop, gateways["unobserved"])
            urls["unobserved"] = f"http://127.0.0.1:{off_port}"
        if args.floor:
            floor_port = free_port()
            gateways["floor"] = start([sys.executable, str(REPO / "benchmarks" / "bare_proxy.py"), "--upstream",
                                       urls["direct"], "--port", str(floor_port)], env, tmp / "floor.log")
            stack.callback(stop, gateways["floor"])
            urls["floor"] = f"http://127.0.0.1:{floor_port}"
        peers, skipped = start_peers(chosen or [], stack, tmp, env, up_port, patch, onnx)
        try:
            wait_ready(urls["direct"], upstream)
            for target, proc in gateways.items():
                wait_ready(urls[target], proc)
        except RuntimeError as e:
            for log in ("upstream.log", "gateway.log", "baseline.log", "floor.log", "unobserved.log"):
                if (tmp / log).exists():
                    print(f"--- {log}\n{(tmp / log).read_text()[-3000:]}", file=sys.stderr)
            print(f"error: {e}", file=sys.stderr)
            return 1

        # The gateway serves one model per leg; the baseline (older code) the JSON leg only.
        served = {"gateway": [LEGS[t] for t in legs], "baseline": [LEGS["gateway"]], "live-off": [LEGS["gateway"]],
                  "unobserved": [LEGS["gateway"]]}
        for target in served:
            if target not in gateways:
                continue
            with Client(urls[target], "bench") as fp:
                for leg, name in served[target]:
                    # The JSON leg says so: `auto` would resolve to binary, `fairpatch upstream` offering the extension.
                    binary = {"binary_data": leg == "binary"}
                    fp.register_model(ModelSpec(name=name, upstream=UpstreamSpec(
                        url=urls["direct"], model_name=MODEL, input_name="input", output_name="logits", **binary),
                        groups=list(data.group_names)))
                    pid = fp.upload_patch(name, patch.for_model(name, "1").to_bytes())
                    fp.activate_patch(name, pid)
                    groups = [data.group_names[g] for g in data.test.groups[:4]] if patch.group_at_inference else None
                    check = fp.infer(name, data.test.X[:4], groups, input_name="input")
                    if check.patch_id != pid:
                        print(f"error: the {target} answered with patch {check.patch_id}, expected {pid}",
                              file=sys.stderr)
                        return 1
        targets = {"direct": urls["direct"], **{t: urls["gateway"] for t in legs}}
        for extra in ("baseline", "floor", "live-off", "unobserved"):
            if extra in urls:
                targets[extra] = urls[extra]
        for peer, (proc, url) in ready_peers(peers, skipped, tmp).items():
            targets[peer], urls[peer], gateways[peer] = url, url, proc
        paths = {t: f"/v2/models/{LEGS[t][1] if t in LEGS else MODEL}/infer" for t in targets}
        answering = {"direct": upstream.pid, **{t: gateways["gateway"].pid for t in legs}}
        for extra in ("baseline", "floor", "live-off", "unobserved", *PEERS):
            if extra in gateways:
                answering[extra] = gateways[extra].pid
        # Each target's processes, as they are now that all are up (nginx's worker, the gateway's Redis).
        trees = {t: process_tree(pid) for t, pid in answering.items()} if chosen is not None else {}
        answers: dict[str, list[float]] = {}
        if chosen is not None:
            answers = target_answers(targets, paths, data, patch)
            problem = answers_problem(answers)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1
            print("answers check: the zero-hop and gateway answers agree, the proxies answer what direct does",
                  flush=True)

        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        cells: list[Cell] = []
        load_before = os.getloadavg()[0]  # other jobs on a shared machine show here
        for batch in batches:
            X = data.test.X[:batch]
            names = [data.group_names[g] for g in data.test.groups[:batch]]
            # With --live-off or --observability every gateway request carries its group (what live fairness
            # counts) and a fresh id (what it remembers for feedback), to both gateways alike.
            live = args.live_off or args.observability
            through = v2_body(X, names if patch.group_at_inference or live else None, live)
            # The floor forwards bytes untouched, so it gets what the upstream gets.
            bodies = {"direct": v2_body(X, None), **{target: through for target in targets if target != "direct"}}
            if "floor" in targets:
                bodies["floor"] = bodies["direct"]
            for peer in PEERS:  # they get what the upstream gets (zero-hop: with the group ids its model takes)
                if peer in targets:
                    bodies[peer] = zero_hop_body(X, data.test.groups[:batch], patch) if peer == "zero-hop" else \
                        bodies["direct"]
            for conc in concurrencies:
                pair = runner(run_pair(args.client, targets, paths, bodies, conc, batch, args.requests, args.seconds,
                                       args.warmup, args.rounds, answering, upstream.pid, trees))
                cells += pair
                for cell in pair:
                    print(f"  batch {batch:>3} concurrency {conc:>3} {cell.target:>14}: p50 {cell.p50:7.2f} ms  "
                          f"p99 {cell.p99:7.2f} ms  {cell.rps:8,.0f} req/s  CPU {cell.cpu_ms:5.2f} ms/req  "
                          f"upstream CPU {cell.upstream_cpu_ms:5.2f} ms/req  "
                          f"({cell.requests} ok, "
                          f"{cell.errors} errors)", flush=True)
        if args.live_off or args.observability:
            counted = live_rows_counted(urls["gateway"])
            print("live fairness is off on the gateway too (FAIRPATCH_LIVE_FAIRNESS=false here)" if counted < 0 else
                  f"live fairness on the gateway counted {counted:,} rows (the other gateway has it off)", flush=True)

    cpu = platform.processor() or platform.machine()
    loader = "`httpx.AsyncClient`" if args.client == "httpx" else "`aiohttp`"
    setup = (f"Adult reference model behind `fairpatch upstream`, `fairpatch serve` (embedded Redis) with an Eraser "
             f"patch active (bias={args.bias}, {args.queries} queries), each in its own process on loopback; "
             f"load from {loader}, at most {args.requests} requests or {args.seconds:g} s per cell in {args.rounds} "
             f"rounds, direct and gateway (upstream legs: {', '.join(LEGS[t][0] for t in legs)})"
             f"{' (and the baseline gateway)' if args.baseline else ''}"
             f"{' (and a pass-through proxy, the floor)' if args.floor else ''}"
             f"{' (and the gateway with live fairness off)' if args.live_off else ''}"
             f"{' (and the gateway with metrics and live fairness off)' if args.observability else ''} alternating"
             f"{'; every gateway request with its groups and a fresh id' if live_load else ''}"
             ". Payload logging off. "
             f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}. Latencies in ms as the client "
             "sees them; the client, upstream and gateway share the machine's cores. CPU ms/req: the answering "
             "server process's own CPU time (user + system, its CPU clock) per request: the upstream's in the direct "
             "rounds, the gateway's (not counting the upstream it calls) in the gateway rounds; the upstream's "
             "own in the gateway rounds beside it.")
    if chosen is not None:
        setup += (f" 1-minute load average {load_before:.1f} before the rounds, {os.getloadavg()[0]:.1f} after."
                  " Targets (--targets): " + ", ".join(chosen) + ". nginx: Debian's /usr/sbin/nginx, 1 worker, "
                  "keep-alive to the upstream, no access log; KServe: its Python transformer (kserve.Model with "
                  "identity preprocess/postprocess, KServe's V2 REST client to the upstream, its per-request log "
                  "lines off) in its own virtualenv; zero-hop: the patch exported into the model "
                  "(`fairpatch patches export --out`) served by `fairpatch upstream`.")
    print_table(cells, f"direct to the upstream vs through the gateway (Eraser patch active), {args.client} client")
    extra = ""
    if chosen is not None:
        from rich.console import Console

        print_peers(Console(width=None if sys.stdout.isatty() else 200), cells, skipped)
        extra = peers_markdown(cells, skipped)
    if args.json:
        write_json(args.json, cells, skipped, answers, argv if argv is not None else sys.argv[1:])
        print(f"wrote {args.json}")
    if args.markdown:
        label = (args.baseline_label or str(args.baseline)) if args.baseline else None
        write_markdown(args.markdown, markdown(cells, setup, label, extra))
        print(f"wrote the section to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
