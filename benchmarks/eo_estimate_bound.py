"""How close can a 100- or 300-query estimate of eo come? (issue 16: "the held-out estimate in the report within
0.02 of the test eo"). Tuning rows only, never the test split.

For the unpatched model (what a refused patch serves), the truth is its eo on every tune row with its real scores
(on Adult sex that lands within 0.014 of the test eo, seeds 0-2). Each draw pays for `stratified_rows` (Eraser's
own allocation) and estimates eo four ways: the paid rows weighted back (ipw); every tune row with the ridge
surrogate's imputed decision (imputed); the same with the surrogate's error put back as 16 draws per row
(draws); and a prediction-powered estimate (each (group, label) cell's imputed rate plus the paid rows' mean
difference between real and cross-fitted imputed decisions). Prints the mean and largest error, the share of
draws within 0.02 and the mean error (bias: a max-abs gap estimated from noisy rates is biased upwards).

    python benchmarks/eo_estimate_bound.py --seeds 0 1 2 --draws 5
"""

from __future__ import annotations

import argparse

import numpy as np


def eo_gap(decision: np.ndarray, y: np.ndarray, groups: np.ndarray, weights: np.ndarray | None = None) -> float:
    w = np.ones(len(y)) if weights is None else weights
    gaps = []
    for label in (0, 1):
        rates = [np.average(decision[(groups == a) & (y == label)], weights=w[(groups == a) & (y == label)])
                 for a in np.unique(groups)]
        gaps.append(max(rates) - min(rates))
    return max(gaps)


def main() -> None:
    from patcher.methods import eraser
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import load_task, tuning_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="adult")
    ap.add_argument("--sensitive", default="sex")
    ap.add_argument("--queries", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    errors: dict[int, list[tuple[float, ...]]] = {q: [] for q in args.queries}
    for seed in args.seeds:
        data, model = load_task(args.dataset, args.sensitive, seed)
        tune = tuning_data(data, data.tune)
        X, y, g = np.asarray(tune.X).reshape(len(tune.y), -1), np.asarray(tune.y), np.asarray(tune.groups)
        lp = OnnxOracle(model.onnx_bytes, cache=False).log_probs(X)
        margin = lp[:, 1] - lp[:, 0]
        truth = eo_gap(margin > 0, y, g)
        prior = eraser.label_prior(X, y, seed)
        print(f"seed {seed}: eo of the unpatched model on all {len(y)} tune rows {truth:.4f}", flush=True)
        for q in args.queries:
            for draw in range(args.draws):
                idx, w = eraser.stratified_rows(g, y, q, seed + 1000 * draw)
                ipw = eo_gap(margin[idx] > 0, y[idx], g[idx], w)
                imputed = eraser.surrogate_margins(X, idx, w, margin[idx], prior)
                spread, rows, ws = eraser.imputed_draws(X, idx, w, margin[idx], g, 16, prior, seed)
                cross = (imputed > 0).astype(float)  # paid rows: cross-fitted imputed decisions
                fold = np.random.default_rng(draw).permutation(np.arange(len(idx)) % 5)
                for k in range(5):
                    rest, held = idx[fold != k], idx[fold == k]
                    cross[held] = eraser.surrogate_margins(X, rest, w[fold != k], margin[rest], prior)[held] > 0
                real, guess = (margin > 0).astype(float), (imputed > 0).astype(float)
                ppi = []
                for label in (0, 1):
                    rates = []
                    for a in np.unique(g):
                        cell = (g == a) & (y == label)
                        paid = idx[cell[idx]]
                        rates.append(guess[cell].mean() + np.mean(real[paid] - cross[paid]))
                    ppi.append(max(rates) - min(rates))
                errors[q].append((ipw - truth, eo_gap(imputed > 0, y, g) - truth,
                                  eo_gap(spread > 0, y[rows], g[rows], ws) - truth, max(ppi) - truth))
    print("queries | estimator | mean |error| | largest | share within 0.02 | mean error")
    for q, e in errors.items():
        a = np.asarray(e)
        for j, name in enumerate(("ipw", "imputed", "draws", "prediction-powered")):
            print(f"{q} | {name} | {np.abs(a[:, j]).mean():.4f} | {np.abs(a[:, j]).max():.4f} | "
                  f"{(np.abs(a[:, j]) <= 0.02).mean():.2f} | {a[:, j].mean():+.4f}")


if __name__ == "__main__":
    main()
