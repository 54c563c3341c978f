"""Development protocol for Eraser at small budgets: tuning rows only, never the test split.

The tune split of each seed is cut 70/30 (stratified by group x label, 5 draws per seed). Eraser fits on the
70% with a query budget and is scored on the 30% with the model's true scores; the test split is not read.
`--eval train` fits on the whole tune split instead and scores on the train split (see --help).
Also prints how well the surrogate imputes the unpaid rows' margins (R^2 against the model's own margins).

A held-out gap over small groups is mostly the held-out rows' own sampling noise (the same for every method), so
the last lines also print, per group, the held-out selection rate's deviation from the overall rate: its mean
over the runs (a bias the method keeps making) and its root mean square with the binomial sampling variance
r(1 - r)/n taken out (the method's own error in that group's rate, noise removed in expectation).

    python benchmarks/eraser_budget_dev.py --queries 100 --criterion dp --seeds 0 1 2 3 4 -o key=value ...
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    from patcher.methods import FitRequest, get_method
    from patcher.metrics import headline
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import load_task, score, tuning_data
    from patcher.tuning import stratified_split

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="adult")
    ap.add_argument("--sensitive", default="sex")
    ap.add_argument("--criterion", default="dp")
    ap.add_argument("--queries", type=int, default=100, help="0: every fit row (a floor for the budgeted fits)")
    ap.add_argument("--method", default="eraser", help="e.g. thresholds with --queries 0: the same split's floor")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--eval", choices=("tune", "train"), default="tune",
                    help="tune: fit on 70%% of the tune split, score on the other 30%%; train: fit on the whole tune "
                    "split (draw d uses seed + 1000 d, so draw 0 is the bench's own fit) and score on the train split "
                    "(the reference model's own training rows, about 2.4x the tune rows: far less sampling noise in "
                    "small groups, scores slightly more confident than on new rows)")
    ap.add_argument("-o", action="append", default=[], help="eraser option key=value (JSON value)")
    args = ap.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.o)}
    method = get_method(args.method)
    rows, deviations = [], []
    for seed in args.seeds:
        data, model = load_task(args.dataset, args.sensitive, seed)
        tune = tuning_data(data, data.tune)
        truth = OnnxOracle(model.onnx_bytes, cache=False).log_probs
        for draw in range(args.draws):
            if args.eval == "train":
                fit_idx, fit_seed = np.arange(len(tune.y)), seed + 1000 * draw
                dev = tuning_data(data, data.train)
            else:
                fit_idx, dev_idx = stratified_split(tune.y, tune.groups, 0.7, [seed, draw, 7])
                fit_seed, dev = seed + draw, tune.subset(dev_idx)
            budget = args.queries or None
            oracle = OnnxOracle(model.onnx_bytes, budget=budget)
            fitted = method.run(oracle, tune.subset(fit_idx), FitRequest(args.criterion, budget, fit_seed),
                                dict(options))
            s = score(fitted.patch, truth, dev.X, dev.y, dev.groups, seed=seed)
            # On the rows it fitted on, with the model's real scores: what the imputation (not the held-out
            # rows' own noise) left of the gap.
            f = score(fitted.patch, truth, tune.X[fit_idx], tune.y[fit_idx], tune.groups[fit_idx], seed=seed)
            deviations.append(rate_deviations(s.after_decisions, dev.groups, tune.n_groups))
            key = f"{args.criterion}_diff"
            rows.append((s.before["accuracy"], s.after["accuracy"], s.before[key], s.after[key], f.after[key]))
            guard = getattr(fitted.report, "guard", None)
            verdict = "" if guard is None else f" guard {guard['verdict']} {guard['change']:+.3f} {guard['change_ci']}"
            alpha = getattr(fitted.report, "alpha", None)
            knobs = "" if alpha is None else f" alpha {alpha:.3g} thr {fitted.report.threshold:.3g}"
            print(f"seed {seed} draw {draw}: acc {s.before['accuracy']:.4f}->{s.after['accuracy']:.4f} "
                  f"{key} {s.before[key]:.4f}->{s.after[key]:.4f}{knobs} fit rows {key} {f.after[key]:.4f}{verdict}",
                  flush=True)
    r = np.array(rows)
    drop = r[:, 0] - r[:, 1]
    print(f"mean: drop {drop.mean() * 100:.2f} pts (sd {drop.std() * 100:.2f}), after {r[:, 3].mean():.4f} "
          f"(sd {r[:, 3].std():.4f}, max {r[:, 3].max():.4f}), before {r[:, 2].mean():.4f}; "
          f"worse than none {(r[:, 3] > r[:, 2]).sum()} of {len(r)}; on the fit rows {r[:, 4].mean():.4f} "
          f"(sd {r[:, 4].std():.4f})")
    _ = headline
    dev = np.array(deviations)  # [runs, groups, (deviation, sampling variance)]
    names = data.group_names
    mean_dev = dev[:, :, 0].mean(0)
    excess = np.sqrt(np.maximum((dev[:, :, 0] ** 2 - dev[:, :, 1]).mean(0), 0.0))
    for a, name in enumerate(names):
        print(f"  {name}: rate - overall, mean {mean_dev[a]:+.4f}; rms beyond sampling noise {excess[a]:.4f}")
    print(f"systematic spread (max - min of the mean deviations) {mean_dev.max() - mean_dev.min():.4f}; "
          f"rms beyond noise over groups {np.sqrt((excess ** 2).mean()):.4f}")


def rate_deviations(decisions: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group: (its selection rate minus the overall rate, the binomial variance of that difference). The
    overall rate is sum_b share_b r_b, the group's own rows included, so the variance is
    (1 - share_a)^2 v_a + sum over the other groups of share_b^2 v_b, with v_b = r_b (1 - r_b) / n_b."""
    decisions = np.asarray(decisions, float)
    n = np.bincount(groups, minlength=n_groups)
    rate = np.bincount(groups, weights=decisions, minlength=n_groups) / np.maximum(n, 1)
    share = n / len(groups)
    v = share**2 * rate * (1 - rate) / np.maximum(n, 1)
    out = np.zeros((n_groups, 2))
    for a in range(n_groups):
        out[a] = (rate[a] - float(decisions.mean()), ((1 - share[a]) / share[a]) ** 2 * v[a] + v.sum() - v[a])
    return out

if __name__ == "__main__":
    main()
