"""The intra-processing debiasers on Adult (sex) and COMPAS (race), criteria dp and eo; writes docs/intra.md.

Every run is `patcher.pipeline.bench` (what `fairpatch bench <method> --json` prints): the
method gets the reference model's ONNX weights and the tune split, the patch's replacement ONNX is
scored once on the test split. Also runs the adversarial fine-tuning ablations on Adult dp (the
reference's flat critic and score target) that docs/intra.md cites for the default choices.

    python benchmarks/intra_benchmarks.py --out docs/intra.md [--seeds 0 1 2] [--json runs.json] [--no-ablation]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from patcher.pipeline import bench

DATASETS = {"adult": "sex", "compas": "race"}
CRITERIA = ("dp", "eo")
METHODS = ("random_perturbation", "layerwise", "adversarial_finetune")
ABLATIONS = {  # name -> adversarial_finetune options (Adult, dp)
    "adversarial_finetune, reference critic (flat) + score target": {"critic": "flat", "bias_target": "scores"},
    "adversarial_finetune, set critic + score target": {"critic": "set", "bias_target": "scores"},
    "adversarial_finetune, reference critic (flat) + operating target": {"critic": "flat"},
}


def run_all(seeds: list[int], ablation: bool, log=print) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    runs = []
    jobs = [(m, ds, c, {}, m) for ds in DATASETS for c in CRITERIA for m in METHODS]
    if ablation:
        jobs += [("adversarial_finetune", "adult", "dp", opts, name) for name, opts in ABLATIONS.items()]
    for seed in seeds:
        for method, ds, crit, opts, label in jobs:
            started = time.perf_counter()
            r = bench(method, dataset=ds, sensitive=DATASETS[ds], criterion=crit, seed=seed, **opts)
            r["label"], r["wall_seconds"] = label, round(time.perf_counter() - started, 1)
            runs.append(r)
            a, b = r["after"], r["before"]
            log(f"{label:>70} {ds:>6} {crit} seed {seed}: {r['bias_measure']} {r['bias_before']:+.4f}->"
                f"{r['bias_after']:+.4f} BA {b['balanced_accuracy']:.4f}->{a['balanced_accuracy']:.4f} "
                f"acc {b['accuracy']:.4f}->{a['accuracy']:.4f} ({r['wall_seconds']}s)")
    return runs


def _fmt(values: list[float], signed: bool = False) -> str:
    m = float(np.mean(values))
    s = f"{m:+.4f}" if signed else f"{m:.4f}"
    return s + (f" ± {float(np.std(values)):.4f}" if len(values) > 1 else "")


def table(runs: list[dict[str, Any]], labels: list[str]) -> list[str]:
    lines = ["| dataset (attr) | criterion | method | bias measure | bias (test) | abs(bias) < 0.05 | balanced acc | "
             "accuracy | dp_diff | eo_diff | access | group at inference | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ds in DATASETS:
        for crit in CRITERIA:
            group = [r for r in runs if r["dataset"] == ds and r["criterion"] == crit]
            if not group:
                continue
            base = [r for r in group if r["label"] == group[0]["label"]]
            measure = base[0]["bias_measure"]
            lines.append(f"| {ds} ({base[0]['sensitive']}) | {crit} | default model (threshold 0) | {measure} | "
                         f"{_fmt([r['bias_before'] for r in base], True)} | "
                         f"{sum(abs(r['bias_before']) < 0.05 for r in base)}/{len(base)} | "
                         f"{_fmt([r['before']['balanced_accuracy'] for r in base])} | "
                         f"{_fmt([r['before']['accuracy'] for r in base])} | "
                         f"{_fmt([r['before']['dp_diff'] for r in base])} | "
                         f"{_fmt([r['before']['eo_diff'] for r in base])} | - | no | - |")
            for label in labels:
                rs = [r for r in group if r["label"] == label]
                if not rs:
                    continue
                lines.append(
                    f"| {ds} ({rs[0]['sensitive']}) | {crit} | {label} | {rs[0]['bias_measure']} | "
                    f"{_fmt([r['bias_after'] for r in rs], True)} | "
                    f"{sum(r['bias_under_epsilon'] for r in rs)}/{len(rs)} | "
                    f"{_fmt([r['after']['balanced_accuracy'] for r in rs])} | "
                    f"{_fmt([r['after']['accuracy'] for r in rs])} | {_fmt([r['after']['dp_diff'] for r in rs])} | "
                    f"{_fmt([r['after']['eo_diff'] for r in rs])} | weights (0 queries) | no | "
                    f"{np.mean([r['fit_seconds'] for r in rs]):.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/intra.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", default=None, help="also write every run's JSON here")
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    runs = run_all(args.seeds, not args.no_ablation)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    labels = list(METHODS) + (list(ABLATIONS) if not args.no_ablation else [])
    out = Path(args.out)
    text = out.read_text() if out.exists() else ""
    marker = "<!-- intra-benchmarks-table -->"
    body = [marker,
            f"Produced by `python benchmarks/intra_benchmarks.py --seeds {' '.join(map(str, args.seeds))}` on "
            f"{dt.date.today()} ({platform.machine()}, {round(time.perf_counter() - started)} s in all). "
            "Fit on the tune split, scored on the test split; bias in AIF360's sign (unprivileged minus "
            "privileged); `before` = the reference model with threshold 0.",
            "", *table(runs, labels), marker]
    if marker in text:  # replace the generated block, keep the hand-written text around it
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + "\n".join(body) + tail
    else:
        text = text + ("\n" if text else "") + "\n".join(body) + "\n"
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
