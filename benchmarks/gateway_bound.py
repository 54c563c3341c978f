"""Where the gateway's CPU goes beyond a bare proxy's, in one process: the bound under its CPU per request.

    python benchmarks/gateway_bound.py [--batch 1] [--requests 8000] [--concurrency 16]

One process holds the gateway app (`service.app.create_app`, embedded Redis, no job worker) and the bare proxy
(benchmarks/bare_proxy.py); both are called straight through ASGI, so the incoming HTTP side (uvicorn's parser and
socket writes, the same for any proxy on this stack) is left out, and each call goes on to a real `fairpatch
upstream` process over loopback with its own pooled aiohttp client. Variants, in alternating rounds: the bare proxy,
the gateway with no patch (forwarding with parsing, checking, the upstream leg and the answer), the gateway with the
Eraser patch (bias=estimator, as gateway_overhead.py fits it), each on a binary upstream leg and on a JSON one.
Figures: the main thread's CPU time per request in each variant's rounds (the loop's own work included), and the
ratio to the bare proxy's. gateway_overhead.py's ratios are lower by the shared HTTP side they include.

With --replay, the gateway's own work alone: each variant's upstream answers are recorded once and then replayed (no
socket, no event loop turn), so a call runs start to end synchronously; figures are the thread's CPU time per call,
the best of the rounds. The upstream client's and the loop's share is left out with the HTTP side, and with them
most of a shared machine's noise: what to compare code changes by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gateway_overhead import fit_patch, free_port, v2_body, wait_ready  # noqa: E402

VARIANTS = ("bare proxy", "patched floor", "gateway, no patch", "gateway, Eraser patch", "gateway, no patch, JSON leg",
            "gateway, Eraser patch, JSON leg")


async def measure(args: argparse.Namespace, upstream_url: str, patch: Any, X: Any, groups: list[str],
                  ) -> dict[str, float]:
    import aiohttp
    import uvicorn

    from benchmarks.bare_proxy import BareProxy, PatchedFloor
    from clients.sdk import AsyncClient, ModelSpec, UpstreamSpec
    from patcher.apply import PatchRunner
    from service.app import create_app
    from service.settings import Settings

    lean = {"live_fairness": False, "metrics": False} if args.lean else {}
    app = create_app(Settings(start_worker=False, **lean))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())  # the management API, to register models as a user would
    while not server.started:
        await asyncio.sleep(0.05)
    models = {"gateway, no patch": "plain", "gateway, Eraser patch": "patched",
              "gateway, no patch, JSON leg": "plain-json", "gateway, Eraser patch, JSON leg": "patched-json"}
    async with AsyncClient(f"http://127.0.0.1:{port}", "bench") as fp:
        for name in models.values():
            await fp.register_model(ModelSpec(name=name, groups=groups, upstream=UpstreamSpec(
                url=upstream_url, model_name="adult", input_name="input", output_name="logits",
                binary_data="json" not in name)))
            if name.startswith("patched"):
                await fp.activate_patch(name, await fp.upload_patch(name, patch.for_model(name, "1").to_bytes()))
    bare = BareProxy(upstream_url)
    bare.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    body = v2_body(X, None)

    def scope(model: str) -> dict[str, Any]:
        path = f"/v2/models/{model}/infer"
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", port)}

    floor = PatchedFloor(upstream_url, PatchRunner(patch))
    floor.session = bare.session
    targets = {"bare proxy": (bare, scope("adult")), "patched floor": (floor, scope("adult")),
               **{v: (app, scope(m)) for v, m in models.items()}}

    async def call(target: Any, sc: dict[str, Any]) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"answered {message['status']}")

        await target(dict(sc), receive, send)

    async def run(target: Any, sc: dict[str, Any], n: int) -> None:
        gate = asyncio.Semaphore(args.concurrency)

        async def one() -> None:
            async with gate:
                await call(target, sc)

        await asyncio.gather(*(one() for _ in range(n)))

    try:
        for target, sc in targets.values():
            await run(target, sc, 300)  # warm-up: caches, pooled connections
        if args.replay:
            return await replayed(args, app, {v: targets[v] for v in models}, call)
        cpu = dict.fromkeys(targets, 0.0)
        per_round = max(1, args.requests // args.rounds)
        for r in range(args.rounds):
            for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                start = time.thread_time()
                await run(*targets[name], per_round)
                cpu[name] += time.thread_time() - start
        return {name: 1000 * seconds / (per_round * args.rounds) for name, seconds in cpu.items()}
    finally:
        await bare.session.close()
        server.should_exit = True
        await serving


async def replayed(args: argparse.Namespace, app: Any, targets: dict[str, tuple[Any, dict[str, Any]]],
                   call: Any) -> dict[str, float]:
    """`--replay`: each gateway variant's CPU per call with the upstream's answers replayed (ms, best of the rounds)."""
    from service import infer

    client, real_call = app.state.upstream, app.state.upstream.call
    answers: dict[tuple[str, bool], Any] = {}

    async def recording(method: str, url: str, payload: Any, timeout_s: float) -> Any:
        reply = await real_call(method, url, payload, timeout_s)
        answers[(url, payload is not None and payload.header_length is not None)] = reply
        return reply

    async def replaying(method: str, url: str, payload: Any, timeout_s: float) -> Any:
        return answers[(url, payload is not None and payload.header_length is not None)]

    ttl = infer.SPEC_TTL_S
    infer.SPEC_TTL_S = 1e9  # no registration re-read (a Redis round trip) in the middle of a round
    client.call = recording
    try:
        for target, sc in targets.values():
            app.state.model_cache.forget(sc["path"].split("/")[3])
            for _ in range(20):
                await call(target, sc)
        client.call = replaying

        def once(target: Any, sc: dict[str, Any]) -> None:
            coro = call(target, sc)
            try:
                coro.send(None)
            except StopIteration:
                return
            coro.close()
            raise RuntimeError("a replayed call waited on something")

        best = dict.fromkeys(targets, float("inf"))
        n = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for name, (target, sc) in targets.items():
                start = time.thread_time()
                for _ in range(n):
                    once(target, sc)
                best[name] = min(best[name], 1000 * (time.thread_time() - start) / n)
        return best
    finally:
        client.call = real_call
        infer.SPEC_TTL_S = ttl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="rows per request")
    ap.add_argument("--requests", type=int, default=8000, help="requests per variant")
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds the requests are split into")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lean", action="store_true",
                    help="the gateway with live fairness and Prometheus metrics off (Settings), as an operator may "
                         "run it")
    ap.add_argument("--replay", action="store_true",
                    help="the gateway's own work alone: the upstream's answers replayed (see above)")
    args = ap.parse_args(argv)
    print("fitting the Eraser patch (bias=estimator, 1000 queries) ...", flush=True)
    model, patch, data = fit_patch("estimator", 1000, args.seed)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fp-bound-")))
        onnx = model.save(tmp / "adult.onnx")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAIRPATCH_") and k != "REDIS_URL"}
        upstream = subprocess.Popen([sys.executable, "-m", "clients", "upstream", "--onnx", str(onnx), "--name",
                                     "adult", "--port", str(port), "--log-level", "warning"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=REPO)
        stack.callback(lambda: (upstream.terminate(), upstream.wait()))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, upstream)
        os.environ.update({"FAIRPATCH_DATA_DIR": str(tmp / "data"), "FAIRPATCH_ADMIN_KEY": "bench",
                           "FAIRPATCH_LOG_LEVEL": "warning"})
        for key in ("FAIRPATCH_REDIS_URL", "FAIRPATCH_PAYLOAD_LOG_URL", "REDIS_URL"):
            os.environ.pop(key, None)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        cpu = runner(measure(args, url, patch, data.test.X[:args.batch], list(data.group_names)))
    if args.replay:
        print(f"batch {args.batch}, the upstream's answers replayed, {args.requests} calls per variant in "
              f"{args.rounds} alternating rounds; CPU ms per call of the gateway's own work, best round:")
        for name, ms in cpu.items():
            print(f"  {name:34s} {ms:6.3f} ms")
        return 0
    bare = cpu["bare proxy"]
    print(f"batch {args.batch}, concurrency {args.concurrency}, {args.requests} requests per variant in "
          f"{args.rounds} alternating rounds; CPU ms per request of the process's main thread:")
    for name in VARIANTS:
        print(f"  {name:34s} {cpu[name]:6.3f} ms  {cpu[name] / bare:5.2f}x the bare proxy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
