"""Every method, side by side: one `fairpatch bench <method>` run per method x dataset x criterion.

Each run is the CLI itself in a subprocess (`.venv/bin/fairpatch bench ... --json`, or
`python -m clients` elsewhere), so the table shows exactly what a user gets, defaults included, and
one slow or failing method cannot stop the others: a failure is written into the table with its
error, never dropped. Writes a markdown table (bias, balanced accuracy, accuracy, what the method
needed: queries or weight access, group at inference yes/no) and the raw JSON.

    python benchmarks/all_methods.py --out docs/all_methods.md --json docs/all_methods.json
    python benchmarks/all_methods.py --methods thresholds eraser --datasets adult --criteria dp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Queries for the query-based methods: Eraser's published point is about 1000; post-processing
# scores the whole tune split (its default); the zeroth-order trigger gets the acceptance budget.
QUERIES = {"eraser": 1000, "trigger": 50000}
EXTRA = {"trigger": ["--access", "gradient"]}
BIAS_KEY = {"dp": "dp_diff", "eo": "eo_diff", "eopp": "eopp_diff"}


def cli() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "fairpatch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "clients"]


def criteria(method: str) -> tuple[str, ...]:
    from patcher.methods import get_method

    m = get_method(method)
    return m.bench.criteria or m.criteria


def run_one(method: str, dataset: str, criterion: str, seed: int, timeout: float) -> dict:
    if criterion not in criteria(method):
        return {"method": method, "dataset": dataset, "criterion": criterion, "skipped": "criterion not supported"}
    cmd = [*cli(), "bench", method, "--dataset", dataset, "--criterion", criterion, "--seed", str(seed), "--json",
           *EXTRA.get(method, [])]
    if method in QUERIES:
        cmd += ["--queries", str(QUERIES[method])]
    started = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"method": method, "dataset": dataset, "criterion": criterion,
                "error": f"timed out after {timeout:.0f}s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]
        return {"method": method, "dataset": dataset, "criterion": criterion, "error": tail[0][:200]}
    result = json.loads(p.stdout[p.stdout.index("{"):])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def access_of(r: dict) -> str:
    if r.get("access") in ("weights", "gradient"):
        return f"{r['access']} access"
    return f"{r.get('queries_used', '?')} queries" + (" (zeroth order)" if r.get("access") == "zeroth_order" else "")


def table(results: list[dict]) -> str:
    lines = ["| dataset | criterion | method | bias before -> after | balanced acc before -> after | "
             "accuracy before -> after | needs | group at inference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["dataset"], r["criterion"], r["method"])):
        if "skipped" in r:
            continue
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['criterion']} | {r['method']} | failed: {r['error']} | | | | |")
            continue
        b, a, key = r["before"], r["after"], BIAS_KEY[r["criterion"]]
        lines.append(
            f"| {r['dataset']} ({r['sensitive']}) | {r['criterion']} | {r['method']} | "
            f"{b[key]:.3f} -> {a[key]:.3f} | {b['balanced_accuracy']:.3f} -> {a['balanced_accuracy']:.3f} | "
            f"{b['accuracy']:.3f} -> {a['accuracy']:.3f} | {access_of(r)} | "
            f"{'yes' if r.get('group_at_inference') else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from patcher.methods import names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered bench except forml "
                    "(FORML trains from scratch; see benchmarks/forml_benchmarks.py)")
    ap.add_argument("--datasets", nargs="*", default=["adult", "compas"])
    ap.add_argument("--criteria", nargs="*", default=["dp", "eo"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write")
    ap.add_argument("--json", type=Path, default=None, help="raw results")
    ap.add_argument("--from-json", type=Path, nargs="*", default=None, help="rebuild the table from saved results")
    args = ap.parse_args(argv)
    methods = args.methods or [m for m in names() if m != "forml"]
    results = []
    for path in args.from_json or []:
        results += [r for r in json.loads(path.read_text()) if r.get("method") in methods
                    and r["criterion"] in criteria(r["method"])]
    for dataset in args.datasets if args.from_json is None else []:
        for criterion in args.criteria:
            for method in methods:
                r = run_one(method, dataset, criterion, args.seed, args.timeout)
                results.append(r)
                key = BIAS_KEY[criterion]
                state = r.get("error") or r.get("skipped") or \
                    f"{key} {r['after'][key]:.3f}, acc {r['after']['accuracy']:.3f} ({r['wall_seconds']}s)"
                print(f"{dataset:8s} {criterion:4s} {method:22s} {state}", flush=True)
    md = table(results)
    print(md)
    if args.out:
        head = (f"# Every method side by side\n\nProduced by `python benchmarks/all_methods.py` (seed {args.seed}) "
                f"on {time.strftime('%Y-%m-%d')}: one `fairpatch bench <method> --json` per row, fitted on the tune "
                "split, scored on the test split it never saw. `before` is the reference model with its default "
                "threshold. Bias is the criterion's gap as Fairlearn measures it (dp_diff; eo_diff = the larger "
                "of the TPR and FPR gaps). The intra-processing methods bound their own measure instead (dp: spd, "
                "eo: eod, the TPR gap only; see docs/intra.md), so their eo rows can show a large FPR gap. "
                "`calibrated_eq_odds` has no dp form. A row whose bias and accuracy do not move is a method whose "
                "cross-fitted guard returned no patch: it could not show on the tune rows that its rule beats the "
                "model alone (docs/guard.md; `-o guard=0` gives the rule).\n\n")
        args.out.write_text(head + md + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
