"""Adversarial fine-tuning: which critic and which selection objective hold up on small tuning sets?

Runs `adversarial_finetune` (fit on the tune split, scored on the test split) for each configuration,
on Adult (sex) and COMPAS (race), dp and eo, over several seeds (the seed also picks the reference
model), and prints a markdown table: per cell `test bias, balanced-accuracy change in points` per seed,
then how many runs are under epsilon and how many keep balanced accuracy within 3 points of the base.

    python benchmarks/adversarial_critics.py --seeds 0 1 [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from patcher.pipeline import bench

CONFIGS = {
    "set, bootstrap 5 (default)": {},
    "exact, bootstrap 5": {"critic": "exact"},
    "exact, bootstrap 0": {"critic": "exact", "bootstrap": 0},
    "set, bootstrap 0": {"bootstrap": 0},
}
SETTINGS = [("adult", "dp"), ("adult", "eo"), ("compas", "dp"), ("compas", "eo")]


def run(seeds: list[int]) -> list[dict]:
    rows = []
    for name, options in CONFIGS.items():
        for dataset, criterion in SETTINGS:
            for seed in seeds:
                started = time.perf_counter()
                r = bench("adversarial_finetune", dataset=dataset, criterion=criterion, seed=seed, **options)
                row = {"config": name, "dataset": dataset, "criterion": criterion, "seed": seed,
                       "bias": r["bias_after"], "under": r["bias_under_epsilon"],
                       "ba_change": 100 * (r["after"]["balanced_accuracy"] - r["before"]["balanced_accuracy"]),
                       "tune_bias": r["tune_after"]["bias"], "best_epoch": r["details"].get("best_epoch"),
                       "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["critic, phi", *(f"{d} {c}" for d, c in SETTINGS), "under epsilon", "BA within 3 pts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        cells = []
        for dataset, criterion in SETTINGS:
            runs = sorted((r for r in mine if r["dataset"] == dataset and r["criterion"] == criterion),
                          key=lambda r: r["seed"])
            cells.append(" / ".join(f"{r['bias']:+.3f}, {r['ba_change']:+.1f}" for r in runs))
        under = sum(r["under"] for r in mine)
        within = sum(r["ba_change"] >= -3 for r in mine)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {under}/{len(mine)} | {within}/{len(mine)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    text = table(run(args.seeds))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
