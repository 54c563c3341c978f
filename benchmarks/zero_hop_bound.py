"""What the zero-hop path costs over direct, without the sockets: the plain model and the exported patched model
(the patch composed in by `export_patched_model`) side by side, in process.

    python benchmarks/zero_hop_bound.py [--bias estimator] [--rounds 10] [--repeat 1500]

Two figures per batch size (1 and 64 rows of the Adult test split):
- `session.run` alone (onnxruntime's work for each graph, warm caches): thread CPU µs per run, the median of
  `--rounds` x `--repeat` calls, the two sessions taking turns call by call (the steadiest figure here);
- the whole `fairpatch upstream` request (the V2 JSON body of benchmarks/gateway_overhead.py through the
  upstream's ASGI app, no HTTP), CPU µs per request and, of it, the thread CPU inside `OnnxModel.run`
  (onnxruntime, with the caches as a request leaves them), in the best of `--rounds` rounds of `--repeat`
  requests, the targets alternating round by round. The plain model is served twice, as `direct` and `direct
  again`: what the two copies differ by is the noise floor every other difference is read against.
The session options are the upstream's (service.local_upstream.OnnxModel). With `--bias group` the exported
model takes the group ids as an extra INT64 input, so the request figures include parsing it. Also printed: the
nodes each session runs once onnxruntime has optimised the graph. gateway_overhead.py's `--targets
direct,zero-hop` is the end-to-end figure; this is the bound under it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_overhead import fit_patch, v2_body, zero_hop_body  # noqa: E402
from patcher.export import export_patched_model  # noqa: E402
from service.local_upstream import OnnxModel, create_upstream_app  # noqa: E402

PATH = "/v2/models/adult/infer"


class TimedModel(OnnxModel):
    """OnnxModel that adds up the thread CPU its runs take (they run in the server's worker threads)."""

    run_cpu_s = 0.0

    def run(self, feeds, outputs):
        t0 = time.thread_time()
        try:
            return super().run(feeds, outputs)
        finally:
            self.run_cpu_s += time.thread_time() - t0


async def call(app, body: bytes) -> None:
    """One POST through the ASGI app, as uvicorn would hand it over."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    status: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"the upstream answered {status}")


def optimised_nodes(model: bytes) -> int:
    """The nodes onnxruntime runs for `model` once its (default) graph optimisations are done."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.log_severity_level = 3  # the warning that such a file is for this machine only: it is not kept
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return len(onnx.load(opts.optimized_model_filepath).graph.node)


def interleaved(runs: list[tuple[OnnxModel, dict[str, np.ndarray]]], calls: int) -> list[float]:
    """Each session's median thread CPU per `run`, the sessions taking turns call by call, so that whatever else
    the machine does falls on all of them alike."""
    took = np.zeros((len(runs), calls))
    for i in range(calls):
        for k, (m, feeds) in enumerate(runs):
            t0 = time.thread_time_ns()
            m.run(feeds, m.output_names)
            took[k, i] = time.thread_time_ns() - t0
    return [float(np.median(row)) / 1e9 for row in took]


Round = Callable[[], Awaitable[tuple[float, float]]]  # one round of calls: (CPU s per call, of it in onnxruntime)


async def alternate(targets: dict[str, Round], n: int) -> dict[str, tuple[float, float]]:
    """Each target's figures in its best round (least CPU) of `n`, the targets alternating forwards and backwards:
    on a shared machine other jobs only ever add time, so the best round is the steadiest figure."""
    out: dict[str, list[tuple[float, float]]] = {t: [] for t in targets}
    for r in range(n):
        for t in list(targets) if r % 2 == 0 else list(targets)[::-1]:
            out[t].append(await targets[t]())
    return {t: min(v) for t, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bias", default="estimator", choices=["estimator", "group"],
                    help="Eraser variant, as gateway_overhead.py (group: the exported model takes the group ids)")
    ap.add_argument("--queries", type=int, default=1000, help="Eraser query budget (default: 1000)")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    ap.add_argument("--repeat", type=int, default=1500, help="calls per target per round (default: 1500)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"fitting the Eraser patch (bias={args.bias}, {args.queries} queries) ...", flush=True)
    model, patch, data = fit_patch(args.bias, args.queries, args.seed)
    exported = export_patched_model(patch, model.onnx_bytes)
    plain_model, patched_model = OnnxModel(model.onnx_bytes, "adult"), OnnxModel(exported, "adult")
    print(f"nodes onnxruntime runs: model {optimised_nodes(model.onnx_bytes)}, exported {optimised_nodes(exported)}")
    timed = {"direct": TimedModel(model.onnx_bytes, "adult"), "direct again": TimedModel(model.onnx_bytes, "adult"),
             "zero-hop": TimedModel(exported, "adult")}
    apps = {t: create_upstream_app(m) for t, m in timed.items()}

    def requests(target: str, body: bytes) -> Round:
        async def one_round() -> tuple[float, float]:
            await call(apps[target], body)  # warm
            timed[target].run_cpu_s = 0.0
            t0 = time.process_time()
            for _ in range(args.repeat):
                await call(apps[target], body)
            return (time.process_time() - t0) / args.repeat, timed[target].run_cpu_s / args.repeat
        return one_round

    async def measure() -> None:
        for batch in (1, 64):
            X = np.ascontiguousarray(data.test.X[:batch], np.float32)
            feeds = {"input": X}
            if patch.group_at_inference:
                feeds["group"] = data.test.groups[:batch].astype(np.int64)
            plain_cpu, patched_cpu = interleaved([(plain_model, {"input": X}), (patched_model, feeds)],
                                                 args.rounds * args.repeat)
            print(f"\nbatch {batch}: session.run alone, thread CPU µs per run (median of {args.rounds * args.repeat} "
                  f"calls, interleaved)\n  model {plain_cpu * 1e6:.2f}, exported {patched_cpu * 1e6:.2f}: the patch "
                  f"adds {(patched_cpu - plain_cpu) * 1e6:.2f} ({patched_cpu / plain_cpu:.2f}x)")

            plain = v2_body(X, None)
            bodies = {"direct": plain, "direct again": plain,
                      "zero-hop": zero_hop_body(X, data.test.groups[:batch], patch)}
            best = await alternate({t: requests(t, b) for t, b in bodies.items()}, args.rounds)
            base = best["direct"][0]
            print(f"batch {batch}: the whole upstream request in process, CPU µs per request (best of "
                  f"{args.rounds} rounds)\n  {'target':>14}  {'request':>8}  {'ratio':>6}  {'in OnnxModel.run':>16}  "
                  f"{'the rest':>8}")
            for t, (cpu, ort_cpu) in best.items():
                print(f"  {t:>14}  {cpu * 1e6:8.1f}  {cpu / base:5.2f}x  {ort_cpu * 1e6:16.1f}  "
                      f"{(cpu - ort_cpu) * 1e6:8.1f}")

    try:
        import uvloop

        uvloop.run(measure())
    except ImportError:
        asyncio.run(measure())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
