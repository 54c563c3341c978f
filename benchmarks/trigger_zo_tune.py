"""Tune-side development runs for the zeroth-order tabular trigger (docs/triggers_zo_dev.md, Adult section).

Never touches the test split: the tune split of each seed is cut into a fitting part and a validation
part (stratified by group and label, `--val` share, several cuts per seed); the trigger is fitted on the
fitting part through a counting oracle with `--queries` rows, and its patch scored on the validation part.
Prints one line per setting: mean and max validation dp_diff, mean and max accuracy drop, and how many
(seed, cut) runs met dp <= 0.05 at a drop <= 0.02.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/trigger_zo_tune.py --seeds 0 1 2 3 4 \
        --grid '{"zo_impute": [0, 1]}'
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np


def runs(seeds: list[int], cuts: int, val: float, queries: int, settings: list[dict], dataset: str = "adult",
         sensitive: str = "sex", criterion: str = "dp") -> list[dict]:
    from patcher.benches.trigger import load
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import score
    from patcher.tuning import TuningData, stratified_split

    out = []
    for seed in seeds:
        data, model = load(dataset, sensitive, seed)
        t = data.tune
        base = OnnxOracle(model.onnx_bytes, cache=False).log_probs
        for cut in range(cuts):
            vrows, frows = stratified_split(t.y, t.groups, val, [seed, 1000 + cut])
            tdata = TuningData(t.X[frows], t.y[frows], t.groups[frows], data.group_names, tuple(data.feature_names))
            for opts in settings:
                oracle = OnnxOracle(model.onnx_bytes, budget=queries)
                res = get_method("trigger").run(oracle, tdata, FitRequest(criterion, queries, seed,
                                                                          access="zeroth_order"), dict(opts))
                s = score(res.patch, base, t.X[vrows], t.y[vrows], t.groups[vrows], seed=seed)
                out.append({"seed": seed, "cut": cut, "opts": opts, "queries": res.report.queries_used,
                            "dp": s.after["dp_diff"], "drop": s.before["accuracy"] - s.after["accuracy"]})
    return out


def summary(rows: list[dict]) -> dict:
    dp, drop = np.array([r["dp"] for r in rows]), np.array([r["drop"] for r in rows])
    return {"n": len(rows), "dp_mean": round(float(dp.mean()), 4), "dp_max": round(float(dp.max()), 4),
            "drop_mean": round(float(drop.mean()), 4), "drop_max": round(float(drop.max()), 4),
            "met": int(((dp <= 0.05) & (drop <= 0.02)).sum()),
            "queries_max": max(r["queries"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--cuts", type=int, default=2)
    ap.add_argument("--val", type=float, default=0.4)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--grid", default="{}", help="JSON: option -> list of values (their product is run)")
    ap.add_argument("--base", default="{}", help="JSON: options every setting shares")
    a = ap.parse_args()
    grid, base = json.loads(a.grid), json.loads(a.base)
    settings = [{**base, **dict(zip(grid, vals, strict=True))} for vals in itertools.product(*grid.values())]
    rows = runs(a.seeds, a.cuts, a.val, a.queries, settings)
    for opts in settings:
        print(json.dumps({"opts": opts, **summary([r for r in rows if r["opts"] == opts])}), flush=True)


if __name__ == "__main__":
    main()
