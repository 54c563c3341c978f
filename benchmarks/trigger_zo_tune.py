"""Tune-side development runs for the zeroth-order tabular trigger (docs/triggers_zo_dev.md, Adult section).

Never touches the test split: the tune split of each seed is cut into a fitting part and a validation
part (stratified by group and label, `--val` share, several cuts per seed); the trigger is fitted on the
fitting part through a counting oracle with `--queries` rows, and its patch scored on the validation part.
Prints one line per setting: mean and max validation dp_diff, mean and max accuracy drop, how many
(seed, cut) runs met dp <= 0.05 at a drop <= 0.02 (`met`, the criterion that chooses), and the mean over runs of
max(dp / 0.05, drop / 0.02) (`excess`, the tie-break: the lower, the nearer both targets).

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
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import load_task, score
    from patcher.tuning import TuningData, stratified_split

    out = []
    for seed in seeds:
        data, model = load_task(dataset, sensitive, seed)
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
            "excess": round(float(np.maximum(dp / 0.05, drop / 0.02).mean()), 4),  # <= 1: both within the target
            "queries_max": max(r["queries"] for r in rows)}


def test_bound(seeds: list[int], queries: int, opts: dict, dataset: str = "adult", sensitive: str = "sex",
               criterion: str = "dp", max_drop: float = 0.02) -> list[dict]:
    """After the settings are frozen only: per seed, the fitted trigger's test figures at its tune-chosen threshold
    beside the hindsight bound, the least test dp over every threshold within `max_drop` of the model's test
    accuracy (the trigger's own curve, chosen on the test split: not a result, the ceiling of the selection)."""
    from patcher.apply import PatchRunner
    from patcher.methods import FitRequest, get_method
    from patcher.methods.eraser import sweep_thresholds
    from patcher.methods.trigger import dataset_options
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import load_task, score, tuning_data

    out = []
    for seed in seeds:
        data, model = load_task(dataset, sensitive, seed)
        fit_opts = {**dataset_options(dataset, opts.get("trigger")), **opts}
        fitted = get_method("trigger").run(OnnxOracle(model.onnx_bytes, budget=queries), tuning_data(data, data.tune),
                                           FitRequest(criterion, queries, seed, access="zeroth_order"), fit_opts)
        patch, report = fitted.patch, fitted.report
        test, model_lp = data.test, OnnxOracle(model.onnx_bytes, cache=False).log_probs
        chosen = score(patch, model_lp, test.X, test.y, test.groups, seed=seed,
                       privileged=data.group_names.index(data.privileged))
        lp = model_lp(PatchRunner(patch).transform_inputs(test.X))
        cuts, acc, unfair = sweep_thresholds(lp[:, 1] - lp[:, 0], test.y, test.groups, len(data.group_names), criterion)
        base_acc = chosen.before["accuracy"]
        k = int(np.argmin(np.where(acc >= base_acc - max_drop, unfair, np.inf)))
        out.append({"seed": seed, "queries": report.queries_used, "dp": chosen.after["dp_diff"],
                    "drop": base_acc - chosen.after["accuracy"], "bound_dp": float(unfair[k]),
                    "bound_drop": float(base_acc - acc[k])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--cuts", type=int, default=2)
    ap.add_argument("--val", type=float, default=0.4)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--grid", default="{}", help="JSON: option -> list of values (their product is run)")
    ap.add_argument("--base", default="{}", help="JSON: options every setting shares")
    ap.add_argument("--test-bound", action="store_true", help="after the freeze: test figures and hindsight bound "
                    "of the --base options (fitted on the whole tune split)")
    a = ap.parse_args()
    grid, base = json.loads(a.grid), json.loads(a.base)
    if a.test_bound:
        for row in test_bound(a.seeds, a.queries, base):
            print(json.dumps(row), flush=True)
        return
    settings = [{**base, **dict(zip(grid, vals, strict=True))} for vals in itertools.product(*grid.values())]
    rows = runs(a.seeds, a.cuts, a.val, a.queries, settings)
    for opts in settings:
        print(json.dumps({"opts": opts, **summary([r for r in rows if r["opts"] == opts])}), flush=True)


if __name__ == "__main__":
    main()
