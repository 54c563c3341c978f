"""The CPU cost of the request metrics' hot-path hook alone, in process: `RequestMetrics.observe` per request plus
its share of the folds into prometheus-client's metrics (a fold every 1,024 requests of a label set, and one at
the end, as before a scrape).

    python benchmarks/metrics_hook.py [--requests 200000]

The end-to-end figure is `benchmarks/gateway_overhead.py --observability`; this isolates what the hook adds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.prometheus import RequestMetrics  # noqa: E402


def per_request_us(n: int) -> float:
    metrics = RequestMetrics()
    t0 = time.process_time()
    for i in range(n):
        # a patched request (upstream and patch times) and, one in ten, an unpatched one (no patch time)
        metrics.observe("adult", "1", "patch", "v2_infer", 200, 0.0012, 0.0008, None if i % 10 == 0 else 0.00005)
    metrics.fold()
    return 1e6 * (time.process_time() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    args = ap.parse_args()
    print(f"RequestMetrics.observe + fold: {per_request_us(args.requests):.2f} us/request "
          f"({args.requests:,} requests, process CPU time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
