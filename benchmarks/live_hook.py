"""The CPU cost of live fairness's hot-path hook alone, in process: `live_observe.record` per request plus its
share of the periodic flush (one pipeline of HINCRBYs and one HSET of request ids into a real embedded Redis).

    python benchmarks/live_hook.py [--requests 20000] [--batch 1,64]

The end-to-end comparison (the gateway with live fairness on against off, in the same rounds) is
`benchmarks/gateway_overhead.py --live-off`; on a shared 2-core machine its CPU figures move by +-10% from run to
run, so this isolates what the hook adds. Each request has its own id (as with feedback) and its rows' groups.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis  # noqa: E402

from service import live_observe  # noqa: E402
from service.oip import Tensor  # noqa: E402
from service.redis_embedded import redis_url_for  # noqa: E402


async def measure(url: str, n: int, batch: int) -> tuple[float, float]:
    redis = Redis.from_url(url)
    live = live_observe.LiveRecorder(redis)
    spec = SimpleNamespace(name="m", version="1", groups=["Female", "Male"],
                           upstream=SimpleNamespace(output_kind="logits"))
    rng = np.random.default_rng(0)
    traces = [SimpleNamespace(raw=s, served=s - 0.1, raw_kind="logits")
              for s in rng.normal(size=(64, batch, 2)).astype(np.float32)]
    calls = [SimpleNamespace(group=Tensor("group", [batch], "BYTES", None,
                                          [["Female", "Male"][j % 2] for j in range(i, i + batch)]),
                             request=SimpleNamespace(id=f"r{i:010d}")) for i in range(n)]
    t0 = time.process_time()
    runner = SimpleNamespace(patch=SimpleNamespace(id="patch"))
    for i, call in enumerate(calls):
        live_observe.record(live, spec, call, runner, "patch", "active", traces[i % 64], None)
    t1 = time.process_time()
    await live.flush()
    t2 = time.process_time()
    await redis.aclose()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--batch", default="1,64")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, redis_url_for(None, d) as url:
        for batch in (int(b) for b in args.batch.split(",")):
            hook, flush = asyncio.run(measure(url, args.requests, batch))
            print(f"batch {batch:>3}: record {hook:6.1f} us/request, flush {flush:5.1f} us/request, "
                  f"total {hook + flush:6.1f} us/request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
