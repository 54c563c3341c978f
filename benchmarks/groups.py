"""Many-valued and intersectional groups on Adult: group thresholds and Eraser against Fairlearn's
ThresholdOptimizer with the same sensitive features, per seed, with the test dp gap's bootstrap interval.

    python benchmarks/groups.py --sensitive sex,race race:all --seeds 0 1 2 > rows.jsonl

Prints one JSON line per (spec, seed, method) and then a markdown table (mean and spread over the seeds).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.peers import threshold_optimizer
from patcher.pipeline import bench as run


def rows_for(spec: str, seed: int, eraser_queries: int) -> list[dict]:
    out = []
    peer = threshold_optimizer("adult", spec, "dp", seed=seed)
    for name, r in (("thresholds", run("thresholds", dataset="adult", sensitive=spec, criterion="dp", queries=None,
                                       seed=seed)),
                    (f"eraser ({eraser_queries} queries)", run("eraser", dataset="adult", sensitive=spec,
                                                               criterion="dp", queries=eraser_queries, seed=seed)),
                    ("ThresholdOptimizer", peer)):
        out.append({"spec": spec, "seed": seed, "method": name, "n_groups": len(r["groups"]),
                    "accuracy": r["after"]["accuracy"], "dp_diff": r["after"]["dp_diff"],
                    "dp_ci": r.get("gaps", {}).get("after", {}).get("dp_diff", {}).get("ci"),
                    "before_dp": r["before"]["dp_diff"], "before_accuracy": r["before"]["accuracy"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensitive", nargs="+", default=["sex,race", "race:all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--queries", type=int, default=1000, help="Eraser's query budget")
    args = ap.parse_args()
    rows = []
    for spec in args.sensitive:
        for seed in args.seeds:
            for row in rows_for(spec, seed, args.queries):
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| groups | method | accuracy | dp gap (all groups) | seed 0 dp 95% interval |")
    print("|---|---|---|---|---|")
    for spec in args.sensitive:
        for method in dict.fromkeys(r["method"] for r in rows if r["spec"] == spec):
            rs = [r for r in rows if r["spec"] == spec and r["method"] == method]
            acc, dp = np.array([r["accuracy"] for r in rs]), np.array([r["dp_diff"] for r in rs])
            ci = next((r["dp_ci"] for r in rs if r["seed"] == args.seeds[0]), None)
            print(f"| {spec} ({rs[0]['n_groups']}) | {method} | {acc.mean():.4f} ± {acc.std():.4f} | "
                  f"{dp.mean():.4f} ± {dp.std():.4f} | {'-' if not ci else f'[{ci[0]:.3f}, {ci[1]:.3f}]'} |")


if __name__ == "__main__":
    main()
