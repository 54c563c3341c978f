"""Development protocol for adversarial fine-tuning settings, on the tune split only (the test split is not read).

The tune split is cut into a pseudo-tune and a pseudo-test half (stratified by group and label, one cut per
split seed). The method is fit on pseudo-tune and scored on pseudo-test against the reference model (threshold
0) on the same rows. Each configuration runs over datasets x criteria x model seeds x split seeds; the summary
counts runs with |bias| < epsilon, runs with balanced accuracy within 3 points of the base, and runs with both.

    python benchmarks/intra_dev.py --datasets compas --configs default exact_bs0 --jsonl dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"critic": "set", "bootstrap": 5},  # the defaults before the dev comparison (docs/intra.md)
    "exact_bs0": {"critic": "exact", "bootstrap": 0},
    "exact_bs0_last_h0": {"critic": "exact", "bootstrap": 0, "train_layers": "last", "holdout": 0.0},
    "exact_bs0_last_h0_se1": {"critic": "exact", "bootstrap": 0, "train_layers": "last", "holdout": 0.0,
                              "se_margin": 1.0},
    "set_bs0_last_h0": {"bootstrap": 0, "train_layers": "last", "holdout": 0.0},
    "exact_bs0_se1": {"critic": "exact", "bootstrap": 0, "se_margin": 1.0},
    "exact_bs0_last": {"critic": "exact", "bootstrap": 0, "train_layers": "last"},
    "set_bs0_last_h0_se1": {"bootstrap": 0, "train_layers": "last", "holdout": 0.0, "se_margin": 1.0},
    "default_last_h0": {"train_layers": "last", "holdout": 0.0},
    "exact_bs0_h05": {"critic": "exact", "bootstrap": 0, "holdout": 0.5},
    "exact_bs0_m03": {"critic": "exact", "bootstrap": 0, "margin": 0.03},
    "exact_bs0_se05": {"critic": "exact", "bootstrap": 0, "se_margin": 0.5},
    "set_bs0": {"bootstrap": 0},
    "exact_bs0_d04": {"critic": "exact", "bootstrap": 0, "delta": 0.04},
    "exact_bs0_b256": {"critic": "exact", "bootstrap": 0, "batch_size": 256},
    "exact_bs0_lam50": {"critic": "exact", "bootstrap": 0, "lam": 50.0},
}
EPSILON = 0.05


def run(datasets: list[str], criteria: list[str], model_seeds: list[int], split_seeds: list[int],
        configs: list[str], share: float, out: Any) -> list[dict]:
    from patcher.access import ModelArtifact
    from patcher.apply import PatchRunner
    from patcher.datasets import load_dataset
    from patcher.methods import FitRequest, get_method
    from patcher.methods.intra_common import CRITERION_MEASURE, balanced_accuracy, bias
    from patcher.oracle import OnnxOracle
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData, stratified_split

    rows = []
    for dataset in datasets:
        data = load_dataset(dataset, None)
        tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
        for model_seed in model_seeds:
            model = reference_model(dataset, data.sensitive, seed=model_seed, data=data)
            base_oracle = OnnxOracle(model.onnx_bytes)
            for split_seed in split_seeds:
                held = stratified_split(tune.y, tune.groups, share, 10_000 + split_seed)[0]
                pseudo_tune = tune.subset(np.setdiff1d(np.arange(len(tune)), held))
                pseudo_test = tune.subset(held)
                y, g, G = pseudo_test.y, pseudo_test.groups, pseudo_test.n_groups
                base = base_oracle.log_probs(pseudo_test.X).argmax(1)
                for criterion in criteria:
                    measure = CRITERION_MEASURE[criterion]
                    for name in configs:
                        started = time.perf_counter()
                        result = get_method("adversarial_finetune").run(
                            ModelArtifact(model.onnx_bytes, name=f"{dataset}_reference"), pseudo_tune,
                            FitRequest(criterion, None, model_seed), CONFIGS[name])
                        patch, report = result.patch, result.report
                        after = PatchRunner(patch).model_logits(pseudo_test.X).argmax(1)
                        row = {"config": name, "dataset": dataset, "criterion": criterion, "model_seed": model_seed,
                               "split_seed": split_seed, "bias": bias(after, y, g, G, measure),
                               "base_bias": bias(base, y, g, G, measure),
                               "ba": balanced_accuracy(after, y), "base_ba": balanced_accuracy(base, y),
                               "select_bias": report.tune_after["bias"],
                               "best_epoch": report.details.get("best_epoch"),
                               "seconds": round(time.perf_counter() - started, 1)}
                        row["ba_change"] = 100 * (row["ba"] - row["base_ba"])
                        print(json.dumps(row), file=out, flush=True)
                        rows.append(row)
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| dataset | config | runs | abs(bias) < 0.05 | BA within 3 pts | both | mean abs(bias) | max abs(bias) | "
             "residual bias (base's sign, mean) | mean BA change (pts) | min BA change (pts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, name in dict.fromkeys((r["dataset"], r["config"]) for r in rows):
        mine = [r for r in rows if r["config"] == name and r["dataset"] == dataset]
        b = np.array([abs(r["bias"]) for r in mine])
        d = np.array([r["ba_change"] for r in mine])
        residual = np.mean([r["bias"] * np.sign(r["base_bias"]) for r in mine])
        lines.append(f"| {dataset} | {name} | {len(mine)} | {(b < EPSILON).sum()} | {(d >= -3).sum()} | "
                     f"{((b < EPSILON) & (d >= -3)).sum()} | {b.mean():.3f} | {b.max():.3f} | {residual:+.3f} | "
                     f"{d.mean():+.1f} | {d.min():+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["compas"])
    parser.add_argument("--criteria", nargs="+", default=["dp", "eo"])
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--share", type=float, default=0.5, help="share of the tune split used as pseudo-test")
    parser.add_argument("--jsonl", help="append one JSON line per run to this file")
    parser.add_argument("--summarise", help="only print the summary of this JSONL file")
    args = parser.parse_args()
    if args.summarise:
        with open(args.summarise) as f:
            print(summary([json.loads(line) for line in f if line.strip()]))
        return
    grid = (args.datasets, args.criteria, args.model_seeds, args.split_seeds, args.configs, args.share)
    if args.jsonl:
        with open(args.jsonl, "a") as out:
            rows = run(*grid, out)
    else:
        rows = run(*grid, sys.stderr)
    print(summary(rows))


if __name__ == "__main__":
    main()
