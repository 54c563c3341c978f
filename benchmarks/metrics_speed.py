"""How long one `fairness_report` takes on the Adult test split (16k rows): methods call it inside tuning loops,
so it must stay in the milliseconds. A measurement, not a test (a loaded CI machine cannot time reliably).

    python benchmarks/metrics_speed.py --calls 20

Prints the mean seconds per call as JSON; `--max-s` exits 1 when the mean is above it (for a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from patcher import metrics as M

ADULT = Path(M.__file__).parent / "data" / "adult.test.csv.gz"


def per_call_s(calls: int) -> float:
    df = pd.read_csv(ADULT)
    y = (df["income"] == ">50K").to_numpy().astype(int)
    p = (df["education_num"] >= 13).to_numpy().astype(int)  # a deterministic "has a degree" rule
    g = df["sex"].to_numpy()
    M.fairness_report(y, p, g)  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        M.fairness_report(y, p, g, privileged="Male")
    return (time.perf_counter() - t0) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--max-s", type=float, default=None, help="fail when a call takes longer on average")
    args = ap.parse_args()
    s = per_call_s(args.calls)
    print(json.dumps({"rows": "adult test split", "calls": args.calls, "per_call_s": round(s, 6)}))
    return 1 if args.max_s is not None and s > args.max_s else 0


if __name__ == "__main__":
    sys.exit(main())
