"""How much accuracy must any group-threshold rule give up for demographic parity? (hindsight bound)

For a reference model, sweep every pair of per-group thresholds on its scores *on the test split
itself* and report the best test accuracy whose dp_diff is within each tolerance. No method that
decides from (model score, group) can beat this on the same rows: Eraser with the group at
inference, Fairlearn's ThresholdOptimizer (up to randomisation) and reject-option all live in that
family. It tells whether an accuracy target is reachable at all on a given model.

    python benchmarks/dp_frontier.py --dataset adult --sensitive sex [--drop-sensitive] [--seeds 0 1 2]
    python benchmarks/dp_frontier.py --recipes --seeds 0 1 2   # other MLP recipes, trained here (not cached)

`--recipes` asks whether the bound is a property of the reference recipe or of the data: it trains the
same data with other architectures and schedules and prints the same bound for each.
"""

from __future__ import annotations

import argparse

import numpy as np

from patcher.datasets import load_dataset
from patcher.oracle import OnnxOracle
from patcher.reference_models import RECIPE, reference_model, train_mlp

RECIPES = {  # name -> training recipe (the first is the reference models' own)
    "reference [64, 32], 20 epochs": RECIPE,
    "[64, 32], 5 epochs": {**RECIPE, "epochs": 5},
    "[32], 10 epochs": {**RECIPE, "hidden": [32], "epochs": 10},
    "logistic regression, 20 epochs": {**RECIPE, "hidden": [], "epochs": 20},
    "[128, 64], 40 epochs": {**RECIPE, "hidden": [128, 64], "epochs": 40},
}


def best_accuracy_under_dp(margin: np.ndarray, y: np.ndarray, groups: np.ndarray, tolerances: list[float]):
    """Two groups: the exact best accuracy over all threshold pairs with |SR_0 - SR_1| <= tol."""
    curves = []
    for g in (0, 1):
        order = np.argsort(-margin[groups == g])
        yy = y[groups == g][order]
        k = np.arange(len(yy) + 1)
        tp = np.concatenate([[0], np.cumsum(yy)])
        correct = tp + ((yy == 0).sum() - (k - tp))  # top-k selected: positives caught + negatives left
        curves.append((k / len(yy), correct))
    (sr0, c0), (sr1, c1) = curves
    out = {}
    for tol in tolerances:
        lo = np.searchsorted(sr1, sr0 - tol, side="left")
        hi = np.searchsorted(sr1, sr0 + tol, side="right")
        best = 0
        for i in range(len(sr0)):
            if hi[i] > lo[i]:
                best = max(best, c0[i] + c1[lo[i]:hi[i]].max())
        out[tol] = best / len(y)
    return out


def mlp_margin(layers: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> np.ndarray:
    """logit1 - logit0 of the MLP given as (W, b) layers with ReLU between them."""
    h = np.asarray(X, np.float64)
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h[:, 1] - h[:, 0]


def report_row(label: str, margin: np.ndarray, y: np.ndarray, g: np.ndarray, tols: list[float]) -> str:
    pred = margin > 0
    base = float(np.mean(pred == y))
    dp = abs(pred[g == 0].mean() - pred[g == 1].mean())
    best = best_accuracy_under_dp(margin, y, g, tols)
    return f"{label}  {base:8.4f}  {dp:7.4f}  " + "  ".join(f"{base - best[t]:10.4f}" for t in tols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="adult")
    ap.add_argument("--sensitive", default="sex")
    ap.add_argument("--drop-sensitive", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", action="store_true", help="train and compare other MLP recipes (see RECIPES)")
    args = ap.parse_args()
    data = load_dataset(args.dataset, args.sensitive, args.drop_sensitive)
    tols = [0.005, 0.01, 0.02, 0.03]
    print(f"{args.dataset} ({data.sensitive}), drop_sensitive={args.drop_sensitive}: "
          "least accuracy drop of any per-group threshold pair, chosen on the test split itself")
    header = "  base_acc  base_dp  " + "  ".join(f"drop@dp<={t}" for t in tols)
    if args.recipes:
        width = max(map(len, RECIPES))
        print(f"{'recipe':{width}s}  seed" + header)
        for name, recipe in RECIPES.items():
            for seed in args.seeds:
                layers = train_mlp(data.train.X, data.train.y, seed, recipe)
                print(report_row(f"{name:{width}s}  {seed:4d}", mlp_margin(layers, data.test.X), data.test.y,
                                 data.test.groups, tols), flush=True)
        return
    print("seed" + header)
    for seed in args.seeds:
        model = reference_model(args.dataset, data.sensitive, drop_sensitive=args.drop_sensitive, seed=seed, data=data)
        lp = OnnxOracle(model.onnx_bytes).log_probs(data.test.X)
        print(report_row(f"{seed:4d}", lp[:, 1] - lp[:, 0], data.test.y, data.test.groups, tols))


if __name__ == "__main__":
    main()
