"""The peers `benchmarks/gateway_overhead.py --targets` measures beside the gateway, in the same rounds.

- `nginx`: Debian's nginx (/usr/sbin/nginx), one worker process, keep-alive connections to the upstream
  (an `upstream {}` block with `keepalive`), no access log: the compiled floor under any proxy.
- `kserve`: KServe's Python transformer with identity pre/post-processing (benchmarks/kserve_transformer.py),
  in the kserve virtualenv of tests/peer_envs.py: the peer a user writes by hand.
- `patched-floor`: benchmarks/bare_proxy.py --patch, the least a Python gateway does to apply the patch (parse the
  tensor, run the patch's output transform, write the answer; no checks, no metrics): the floor under the
  gateway's own CPU target, which the gateway's checks and features are measured against.
- `zero-hop`: the patch exported into the model (`fairpatch patches export PATCH --model M --out P`,
  patcher/export.py) and served by `fairpatch upstream` like the plain model: no hop at all.

A target that cannot run here raises `TargetUnavailable` with the reason; the benchmark prints it and goes on
without that target. CPU per request is summed over a target's whole process tree (nginx's master and worker,
the gateway's embedded Redis and job worker), each process's user + system time from its CPU clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGINX = Path(os.environ.get("FAIRPATCH_BENCH_NGINX", "/usr/sbin/nginx"))
# The names --targets takes, in the order the rounds visit them; `bare` is the existing --floor proxy and
# `gateway` stands for the gateway legs picked by --legs.
TARGET_NAMES = ("direct", "bare", "patched-floor", "nginx", "kserve", "zero-hop", "gateway")
PEERS = ("nginx", "kserve", "zero-hop", "patched-floor")
UPSTREAM_KEEPALIVE_S = 3  # idle upstream connections are closed before uvicorn's 5 s keep-alive closes them


class TargetUnavailable(RuntimeError):
    """A target that cannot run on this machine; the message says why."""


def parse_targets(spec: str) -> list[str]:
    """`--targets` as a list of known names (`floor` is accepted for `bare`); direct is always measured."""
    names = [{"floor": "bare"}.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGET_NAMES)}")
    return ["direct", *(n for n in TARGET_NAMES[1:] if n in names)]


# --- nginx -------------------------------------------------------------------------------------------

def nginx_config(tmp: Path, port: int, upstream_port: int) -> str:
    """One worker, upstream keep-alive, request bodies kept in memory (a batch-64 body is ~31 KB), no access log."""
    return f"""worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream model {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_timeout {UPSTREAM_KEEPALIVE_S}s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_command(tmp: Path, port: int, upstream_port: int) -> list[str]:
    """nginx in the foreground (`daemon off`) with its config, pid and logs in `tmp`."""
    if not (NGINX.is_file() and os.access(NGINX, os.X_OK)):
        raise TargetUnavailable(f"no nginx at {NGINX} (apt-get install nginx-light, or set FAIRPATCH_BENCH_NGINX)")
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, port, upstream_port))
    return [str(NGINX), "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf), "-g", "daemon off;"]


# --- KServe ------------------------------------------------------------------------------------------

def kserve_command(port: int, upstream_port: int, model: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The transformer's command line and environment, in the kserve virtualenv (built on first use)."""
    from tests import peer_envs  # the repository root is on sys.path (gateway_overhead.py puts it there)

    try:
        venv = peer_envs.ensure("kserve")
    except peer_envs.PeerEnvUnavailable as e:
        raise TargetUnavailable(f"the kserve virtualenv could not be built: {e}") from e
    cmd = [str(venv.python), str(REPO / "benchmarks" / "kserve_transformer.py"), "--model_name", model,
           "--predictor_host", f"127.0.0.1:{upstream_port}", "--predictor_protocol", "v2", "--http_port", str(port),
           "--enable_grpc", "false", "--workers", "1", "--enable_latency_logging", "false",
           "--configure_logging", "false"]
    return cmd, venv.environ(env)


# --- zero-hop ----------------------------------------------------------------------------------------

def export_zero_hop(patch_file: Path, model_onnx: Path, out: Path, env: dict[str, str]) -> Path:
    """The patch composed into the model with the CLI a user runs (`fairpatch patches export ... --out`)."""
    done = subprocess.run([sys.executable, "-m", "clients", "patches", "export", str(patch_file), "--model",
                           str(model_onnx), "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise TargetUnavailable(f"the patch could not be exported: {(done.stderr or done.stdout).strip()[-500:]}")
    return out


# --- CPU over a process tree -------------------------------------------------------------------------

def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    return out


def process_tree(pid: int) -> tuple[int, ...]:
    """`pid` and every process under it now (read once the target is up: its children do not change after)."""
    parents = _parents()
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tuple(tree)


def trees(pids: dict[str, int], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    return {n: process_tree(pids[n]) for n in names if n in pids}


# --- the side-by-side report -------------------------------------------------------------------------

LABELS = {"direct": "direct (`fairpatch upstream`, plain model)",
          "zero-hop": "zero-hop (`fairpatch upstream`, patched model)",
          "nginx": "nginx, 1 worker, upstream keep-alive", "floor": "bare Python proxy (uvicorn + aiohttp)",
          "patched-floor": "patched floor (the bare proxy + parse, patch, answer; no checks, no metrics)",
          "gateway": "fairpatch gateway, JSON leg", "gateway-binary": "fairpatch gateway, binary leg",
          "kserve": "KServe transformer, identity pre/post"}
ORDER = tuple(LABELS)  # the report's order
SHORT = {"floor": "bare"}  # the tables name targets as --targets does
SERVES_ITSELF = ("direct", "zero-hop")  # the others call the upstream, whose CPU per request is beside theirs
CPU_TARGETS = {1: 1.5, 64: 2.0}  # the gateway's CPU per request at most this times the bare proxy's, by batch


def _by(cells: list) -> dict[tuple[str, int, int], object]:
    return {(c.target, c.batch, c.concurrency): c for c in cells}


def _keys(cells: list) -> list[tuple[int, int]]:
    return sorted({(c.batch, c.concurrency) for c in cells})


def _name(target: str) -> str:
    return SHORT.get(target, target)


def total_cpu_ms(cell) -> float:
    """The whole path's CPU per request: the target's processes, plus the upstream's where it calls one."""
    return cell.own_cpu_ms if cell.target in SERVES_ITSELF else cell.own_cpu_ms + cell.upstream_cpu_ms


PEER_HEAD = ["batch", "conc.", "target", "p50 ms", "added p50 ms", "p99 ms", "req/s", "req/s vs direct",
             "CPU ms/req (own processes)", "CPU ms/req upstream", "CPU ms/req whole path", "requests", "errors"]


def peer_rows(cells: list) -> list[list[str]]:
    """One row per target and cell, every target measured in the same alternating rounds."""
    by, out = _by(cells), []
    for batch, conc in _keys(cells):
        d = by.get(("direct", batch, conc))
        for target in ORDER:
            c = by.get((target, batch, conc))
            if c is None or d is None:
                continue
            up = "-" if target in SERVES_ITSELF else f"{c.upstream_cpu_ms:.2f}"
            out.append([str(batch), str(conc), _name(target), f"{c.p50:.2f}",
                        "" if target == "direct" else f"{c.p50 - d.p50:+.2f}", f"{c.p99:.2f}", f"{c.rps:,.0f}",
                        f"{c.rps / d.rps:.0%}", f"{c.own_cpu_ms:.3f}", up, f"{total_cpu_ms(c):.3f}",
                        str(c.requests), str(c.errors)])
    return out


def cpu_pivot(cells: list) -> tuple[list[str], list[list[str]]]:
    """CPU ms per request of each target's own processes, a column per (batch, concurrency)."""
    by, keys = _by(cells), _keys(cells)
    head = ["target", *(f"b{b} c{c}" for b, c in keys)]
    body = [[_name(t), *(f"{by[(t, b, c)].own_cpu_ms:.3f}" if (t, b, c) in by else "" for b, c in keys)]
            for t in ORDER if any((t, b, c) in by for b, c in keys)]
    for t in ("gateway", "gateway-binary"):  # its embedded Redis and job worker work on a clock, not per request
        if any((t, b, c) in by for b, c in keys):
            body.append([f"{t} (its own process alone)",
                         *(f"{by[(t, b, c)].cpu_ms:.3f}" if (t, b, c) in by else "" for b, c in keys)])
    return head, body


RATIOS = (("gateway / bare proxy, CPU", "gateway", "floor", "own_cpu_ms"),
          ("patched floor / bare proxy, CPU", "patched-floor", "floor", "own_cpu_ms"),
          ("gateway / patched floor, CPU", "gateway", "patched-floor", "own_cpu_ms"),
          ("gateway binary leg / bare proxy, CPU", "gateway-binary", "floor", "own_cpu_ms"),
          ("gateway / nginx, CPU", "gateway", "nginx", "own_cpu_ms"),
          ("KServe transformer / gateway, CPU", "kserve", "gateway", "own_cpu_ms"),
          ("zero-hop / direct, CPU", "zero-hop", "direct", "own_cpu_ms"),
          ("zero-hop / direct, p50", "zero-hop", "direct", "p50"))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def ratio_rows(cells: list) -> tuple[list[str], list[list[str]]]:
    by, keys = _by(cells), _keys(cells)
    head = ["ratio", *(f"b{b} c{c}" for b, c in keys)]
    body = []
    for label, a, b_, attr in RATIOS:
        vals = [(by.get((a, b, c)), by.get((b_, b, c))) for b, c in keys]
        if all(x is None or y is None for x, y in vals):
            continue
        body.append([label, *("" if x is None or y is None else _ratio(getattr(x, attr), getattr(y, attr))
                              for x, y in vals)])
    return head, body


def peer_verdict(cells: list) -> list[str]:
    """The issue's targets: zero-hop within 10% of direct (CPU and p50); the gateway's CPU at most 1.5x the
    bare proxy's at batch 1 and 2x at batch 64."""
    by, lines = _by(cells), []
    for batch, conc in _keys(cells):
        z, d = by.get(("zero-hop", batch, conc)), by.get(("direct", batch, conc))
        if z is not None and d is not None:
            if not (d.own_cpu_ms > 0 and d.p50 > 0):
                continue
            cpu, p50 = z.own_cpu_ms / d.own_cpu_ms, z.p50 / d.p50
            lines.append(f"zero-hop, batch {batch}, concurrency {conc}: CPU {cpu:.0%} and p50 {p50:.0%} of direct "
                         f"(target <= 110% both): {'met' if cpu <= 1.1 and p50 <= 1.1 else 'NOT met'}")
    for batch, conc in _keys(cells):
        f, limit = by.get(("floor", batch, conc)), CPU_TARGETS.get(batch)
        p = by.get(("patched-floor", batch, conc))
        if f is not None and p is not None and limit is not None and f.own_cpu_ms > 0:
            r = p.own_cpu_ms / f.own_cpu_ms
            lines.append(f"patched floor, batch {batch}, concurrency {conc}: CPU {r:.2f}x the bare proxy's, before "
                         f"any check or metric (the gateway's target: <= {limit:g}x)")
        for leg in ("gateway", "gateway-binary"):
            g = by.get((leg, batch, conc))
            if f is None or g is None or limit is None or not f.own_cpu_ms > 0:
                continue
            r, alone = g.own_cpu_ms / f.own_cpu_ms, g.cpu_ms / f.own_cpu_ms
            lines.append(f"{LABELS[leg]}, batch {batch}, concurrency {conc}: CPU {r:.2f}x the bare proxy's "
                         f"(the gateway process alone: {alone:.2f}x; target <= {limit:g}x): "
                         f"{'met' if r <= limit else 'NOT met'}")
    return lines


def _md(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in body)]


def peers_markdown(cells: list, skipped: dict[str, str]) -> str:
    legend = "; ".join(f"`{_name(t)}`: {LABELS[t]}" for t in ORDER if any(c.target == t for c in cells))
    lines = ["### Every target side by side, same rounds", "", f"Targets: {legend}.", "",
             "CPU ms per request of each target's own processes (user + system, summed over the "
             "target's process tree: nginx's master and worker; the gateway with its embedded Redis and job "
             "worker); the upstream's CPU in the same rounds beside it for the targets that call it:", "",
             *_md(*cpu_pivot(cells)), "", *_md(*ratio_rows(cells)), "", *_md(PEER_HEAD, peer_rows(cells)), "",
             *(f"- {v}" for v in peer_verdict(cells))]
    lines += [f"- {t}: not measured ({why})" for t, why in skipped.items()]
    return "\n".join(lines) + "\n"


def print_peers(console, cells: list, skipped: dict[str, str]) -> None:
    from rich.table import Table

    for t in ORDER:
        if any(c.target == t for c in cells):
            console.print(f"{_name(t)}: {LABELS[t]}")
    for title, (head, body) in (("CPU ms per request, each target's own processes", cpu_pivot(cells)),
                                ("ratios", ratio_rows(cells)),
                                ("every target, same rounds", (PEER_HEAD, peer_rows(cells)))):
        table = Table(title=title)
        for h in head:
            table.add_column(h, justify="right")
        for r in body:
            table.add_row(*r)
        console.print(table)
    for v in peer_verdict(cells):
        console.print(v)
    for t, why in skipped.items():
        console.print(f"{t}: not measured ({why})")
