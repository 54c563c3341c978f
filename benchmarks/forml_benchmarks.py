"""FORML against uniform weighting over seeds, and data condensation; writes docs/forml.md.

For Adult (sex, eopp), colored digits (color, eopp) and noisy digits (10 classes, per-class TPRD): both arms of
`fairpatch bench forml` (same architecture, epochs, data and seed; FORML's exemplar set is the tune split) for
every seed, means with standard errors and the paired differences. Condensation (the paper's section 4.2): the
uniform model retrained on the training rows FORML keeps (the lowest 10% by EMA of the weighted loss, or by
learned weight, dropped) against a random subset of the same size, on the same test split.

    python benchmarks/forml_benchmarks.py --out docs/forml.md [--seeds 0 1 2 3 4] [--workers 3] [--json runs.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = {"adult": "eopp", "colored-digits": "eopp", "noisy-digits": "eopp"}
CONDENSE = ("adult", "colored-digits")
METRICS = ("accuracy", "tprd", "max_fnr", "worst_group_accuracy")
VARIANTS = {  # ablations on Adult (appendix A.2): other meta-losses, the reverse updates
    "max_loss_d": {"meta_loss": "max_loss_d"}, "cross_entropy": {"meta_loss": "cross_entropy"},
    "reverse_model": {"reverse": "model"}, "reverse_weights": {"reverse": "weights"},
}


def one_run(dataset: str, seed: int, variant: str = "default") -> dict[str, Any]:
    """The bench JSON for (dataset, seed, variant) plus, for CONDENSE datasets, the condensation retrains."""
    import torch

    torch.set_num_threads(1)
    from patcher.apply import PatchRunner
    from patcher.methods import FitRequest, get_method
    from patcher.methods.forml_audit import arm_options, bench_forml_report, summary_metrics
    from patcher.pipeline import load_data, tuning_data

    started = time.perf_counter()
    result, report = bench_forml_report(dataset=dataset, criterion=DATASETS[dataset], seed=seed,
                                        **VARIANTS.get(variant, {}))
    result["variant"] = variant
    if dataset in CONDENSE and variant == "default":
        data = load_data(dataset, None)
        priv = data.group_names.index(data.privileged)
        train, exemplar, test = tuning_data(data, data.train), tuning_data(data, data.tune), data.test
        opts = arm_options(train.X.ndim == 4, None)
        n_classes = int(train.y.max()) + 1
        audit = report.audit  # the exemplar set is given, so audit rows are training positions
        kept = len(audit.condensed_indices)
        rng = np.random.default_rng(10_000 + seed)
        subsets = {"condensed_ema": np.asarray(audit.condensed_indices),
                   "condensed_weight": np.sort(np.asarray(audit.rank_by_weight)[len(train) - kept:]),
                   "random": np.sort(rng.choice(len(train), len(audit.condensed_indices), replace=False))}
        result["condensation"] = {}
        for name, rows in subsets.items():
            patch = get_method("forml").run(None, train.subset(rows), FitRequest(DATASETS[dataset], None, seed,
                                                                                  exemplar=exemplar),
                                            {**opts, "uniform": True}).patch
            pred = PatchRunner(patch).model_logits(test.X).argmax(1)
            result["condensation"][name] = {"n": int(len(rows)), **summary_metrics(test.y, pred, test.groups,
                                                                                  n_classes, priv)}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, se = mean_se([v * scale for v in values])
    return f"{m:.2f} ± {se:.2f}"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in DATASETS:
        rs = [r for r in runs if r["dataset"] == dataset and r.get("variant", "default") == "default"]
        if not rs:
            continue
        b = {k: [r["before"][k] for r in rs] for k in METRICS}
        a = {k: [r["after"][k] for r in rs] for k in METRICS}
        rel = [(r["after"]["tprd"] - r["before"]["tprd"]) / r["before"]["tprd"] for r in rs]
        acc = [r["after"]["accuracy"] - r["before"]["accuracy"] for r in rs]
        out[dataset] = {"seeds": [r["seed"] for r in rs], "before": b, "after": a,
                        "tprd_rel_change": rel, "accuracy_change": acc,
                        "tprd_rel_change_of_means": (np.mean(a["tprd"]) - np.mean(b["tprd"])) / np.mean(b["tprd"]),
                        "fit_seconds": [r["fit_seconds"] for r in rs],
                        "uniform_fit_seconds": [r["uniform_fit_seconds"] for r in rs]}
        if all("condensation" in r for r in rs):
            out[dataset]["condensation"] = {
                name: {k: [r["condensation"][name][k] for r in rs] for k in ("n", *METRICS)}
                for name in rs[0]["condensation"]}
    return out


USAGE = """
## What FORML does here

`patcher.methods.forml` (FORML: Yan, Seto, Apostoloff, ICML 2022, Algorithm 1) trains a model from scratch
(the reference MLP for tabular rows, the reference CNN for images) or fine-tunes a given one (a
`ModelArtifact`: ONNX through onnx2torch) with one learned weight per training row. Per batch: a one-step SGD
lookahead of the softmax-weighted loss (`torch.func.functional_call`, no model copy); the fairness meta-loss of
the lookahead model on an exemplar batch with a minimum count per (group, label) cell, differentiated to the
batch's weight logits; then the real Adam step with the updated weights. Meta-losses: MeanLossD (default) and
MaxLossD, the mean / max over cells of |cell loss - pooled loss|; the cells follow the criterion (eopp: each
group's positives, eo: each (group, label) cell, dp: each group's soft selection rate; for more than two classes
the classes, as the paper's CIFAR and MNIST runs); cross-entropy is the ablation. `reverse` flips the lookahead
("model"), the weight update ("weights") or both (appendix A.2).

```python
from patcher.methods import FitRequest, get_method
from patcher.methods.forml_audit import export_condensed

result = get_method("forml").run(None, train, FitRequest("eopp", exemplar=exemplar))  # or a ModelArtifact
patch, report = result.patch, result.report
patch.part("replacement_model")          # ONNX, input like the model's, output `logits`: the weight patch
patch.arrays()["sample_weights"]          # learned weights, mean 1 over the training rows (NaN: held-out exemplars)
report.audit.rank_by_weight[:20]          # training rows with the lowest learned weight
report.audit.rank_by_ema[:20]             # ... with the lowest EMA of their weighted loss (the paper's ranking)
condensed = export_condensed(train, report.audit)   # the training set without the lowest 10%
```

Without `exemplar`, a stratified 20% of `data` is held out as the exemplar set. Every run reports TPRD and max
FNR (`report.train_metrics`, `report.exemplar_metrics`) and checks its ONNX export against the torch model
(`report.onnx_max_abs_diff`).

`fairpatch bench forml --dataset adult|compas|german|colored-digits|noisy-digits --criterion eopp|eo|dp --seed S
--json` trains both arms (uniform = `before`, FORML = `after`) on the train split, FORML's exemplar set is the
tune split, both are scored on the test split through the patch's ONNX model. Options (`-o key=value`):
`epochs`, `meta_loss`, `reverse`, `weight_lr`, `ce_weight`; flag `--fine-tune` (start both arms from the
reference model).

Departures from the paper, on purpose:
- The weight gradient is multiplied by the batch size (softmax weights are about 1/B, so otherwise the
  right weight learning rate would depend on B); `weight_lr` = 0.01 per row. The paper uses the model's
  learning rate with plain SGD; at that scale the weights do not move in 20 epochs of Adult.
- The real step uses the model's own optimizer (Adam, the reference recipe and the paper's Celeb-A setting),
  the lookahead plain SGD with `lookahead_lr` = 0.1.
- For eopp the discrepancy is measured on the positives only (TPR parity is what eopp asks). Adding the
  exemplar cross-entropy to the meta-loss (`ce_weight`) cost accuracy on Adult: the exemplar batches
  over-sample the small cells, so their cross-entropy pulls towards more positive decisions (seed 0:
  ce_weight 1 with weight_lr 0.1 gave accuracy 83.19 vs 84.56 uniform). The default is 0.
- The default does not reverse: on Adult the paper's preferred reverse update of the model parameters is
  measured in the ablation table below.
- Condensation drops the lowest 10% by EMA of the normalised weighted loss B * softmax(w)_i * l_i (the paper's
  section 4.2); `condense_by="weight"` drops the lowest learned weights instead.
"""


def ablation_lines(runs: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in runs if r["dataset"] == "adult"]
    seeds = sorted({r["seed"] for r in rows if r.get("variant", "default") != "default"})
    if not seeds:
        return []
    lines = ["", "## Ablations on Adult (sex, eopp): meta-loss and reverse updates (appendix A.2)", "",
             f"Seeds {', '.join(map(str, seeds))}; the uniform arm is the same in every row.", "",
             "| variant | accuracy | TPRD | max FNR | worst-group acc | TPRD relative change |",
             "|---|---|---|---|---|---|"]
    base = [r for r in rows if r.get("variant", "default") == "default" and r["seed"] in seeds]
    lines.append("| uniform | " + " | ".join(fmt([r["before"][k] for r in base]) for k in METRICS) + " | |")
    for variant in ("default", *VARIANTS):
        rs = [r for r in rows if r.get("variant", "default") == variant and r["seed"] in seeds]
        if len(rs) != len(seeds):
            continue
        rel = [(r["after"]["tprd"] - r["before"]["tprd"]) / r["before"]["tprd"] for r in rs]
        name = "FORML (MeanLossD, no reverse)" if variant == "default" else variant
        lines.append(f"| {name} | " + " | ".join(fmt([r["after"][k] for r in rs]) for k in METRICS)
                     + f" | {fmt(rel)} % |")
    return lines


def write_markdown(summary: dict[str, Any], runs: list[dict[str, Any]], path: Path, wall: float) -> None:
    names = {"adult": "Adult (sex), eopp", "colored-digits": "Colored digits (color), eopp",
             "noisy-digits": "Noisy digits (20% of train labels flipped to 2), per-class TPRD"}
    lines = [
        "# FORML: meta-learned sample weights against uniform weighting",
        "",
        "Generated by `python benchmarks/forml_benchmarks.py` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs, 1 torch thread per run; runs resumed from `--json` are not "
        f"re-run, this invocation took {wall / 60:.1f} min). All figures are on the "
        "held-out test split, in percent, mean ± standard error over the seeds listed. Both arms train the same "
        "architecture (Adult: the reference MLP [64, 32], Adam 1e-3, batch 256, 20 epochs; digits: the reference "
        "CNN recipe `patcher.digits.CNN_RECIPE`, flatten head, Adam 3e-3, batch 64, 12 epochs) on the train "
        "split with the same seed, so they see the same "
        "batches in the same order; FORML's exemplar set is the tune split (min 32 rows per (group, label) cell "
        "in each exemplar batch of 512 for Adult, 8 of 128 for digits). Defaults: MeanLossD, weight_lr 0.01 "
        "per row, lookahead_lr 0.1, no reverse update, no cross-entropy in the meta-loss.",
        USAGE,
        "## FORML vs uniform weighting",
        "",
        "| task | seeds | arm | accuracy | TPRD | max FNR | worst-group acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, s in summary.items():
        for arm, label in (("before", "uniform"), ("after", "FORML")):
            lines.append(f"| {names[dataset]} | {len(s['seeds'])} | {label} | "
                         + " | ".join(fmt(s[arm][k]) for k in METRICS) + " |")
    lines += ["", "Paired per seed (FORML minus uniform, same seed):", "",
              "| task | TPRD relative change | TPRD change of the means | accuracy change (points) | "
              "FORML fit s | uniform fit s |", "|---|---|---|---|---|---|"]
    for dataset, s in summary.items():
        lines.append(f"| {names[dataset]} | {fmt(s['tprd_rel_change'])} % | "
                     f"{100 * s['tprd_rel_change_of_means']:+.1f} % | {fmt(s['accuracy_change'])} | "
                     f"{np.mean(s['fit_seconds']):.0f} | {np.mean(s['uniform_fit_seconds']):.0f} |")
    lines += ["", "Fit seconds are wall time on a loaded 2-core machine (several parallel jobs), not CPU time.", "",
              "Against the issue's targets (computed from the runs above):", ""]
    for dataset, s in summary.items():
        acc = float(np.mean(s["accuracy_change"]))
        rel = 100 * s["tprd_rel_change_of_means"]
        if dataset == "noisy-digits":
            ok = acc >= 0 and rel < 0
            target = "FORML accuracy >= uniform and TPRD lower"
        else:
            ok = rel <= -10 and acc >= -0.005
            target = "TPRD down >= 10% relative, accuracy within 0.5 points"
        worst = min(s["accuracy_change"])
        lines.append(f"- {names[dataset]}: {target}: **{'met' if ok else 'not met'}** (TPRD {rel:+.1f}% of the "
                     f"means, accuracy {100 * acc:+.2f} points on average; worst seed {100 * worst:+.2f} points; "
                     f"TPRD lower on {sum(v < 0 for v in s['tprd_rel_change'])} of {len(s['seeds'])} seeds)")
    lines += ["", "Per seed (test split):", "", "| task | seed | uniform acc | FORML acc | uniform TPRD | FORML TPRD |",
              "|---|---|---|---|---|---|"]
    defaults = [r for r in runs if r.get("variant", "default") == "default"]  # the ablations have their own table
    for r in sorted(defaults, key=lambda r: (list(DATASETS).index(r["dataset"]), r["seed"])):
        b, a = r["before"], r["after"]
        lines.append(f"| {r['dataset']} | {r['seed']} | {100 * b['accuracy']:.2f} | {100 * a['accuracy']:.2f} | "
                     f"{100 * b['tprd']:.2f} | {100 * a['tprd']:.2f} |")
    cond = {d: s["condensation"] for d, s in summary.items() if "condensation" in s}
    if cond:
        lines += ["", "## Data condensation: retraining with uniform weights on 90% of the training rows", "",
                  "The FORML run's audit drops the 10% of training rows with the lowest EMA of the normalised "
                  "weighted loss (the paper's rule) or with the lowest learned weight; a random subset of the same "
                  "size is the control. Same architecture, epochs and seed as the uniform run on all rows.", "",
                  "| task | training rows | n | accuracy | TPRD | max FNR | worst-group acc |",
                  "|---|---|---|---|---|---|---|"]
        labels = {"condensed_ema": "FORML-condensed (EMA)", "condensed_weight": "FORML-condensed (weight)",
                  "random": "random subset"}
        for dataset, c in cond.items():
            s = summary[dataset]
            n_all = next(r["n_train"] for r in runs if r["dataset"] == dataset)
            lines.append(f"| {names[dataset]} | all (uniform) | {n_all} | "
                         + " | ".join(fmt(s["before"][k]) for k in METRICS) + " |")
            for name, label in labels.items():
                lines.append(f"| {names[dataset]} | {label} | {int(np.mean(c[name]['n']))} | "
                             + " | ".join(fmt(c[name][k]) for k in METRICS) + " |")
    lines += ablation_lines(runs)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/forml.md"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="Adult seeds for the meta-loss / reverse ablations (none: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="raw runs: read (resume) and written")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["dataset"], r["seed"], r.get("variant", "default")) for r in runs}
    jobs = [(d, s, "default") for d in args.datasets for s in args.seeds]
    if "adult" in args.datasets:
        jobs += [("adult", s, v) for s in args.ablation_seeds for v in VARIANTS]
    jobs = [j for j in jobs if j not in done]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        for (d, s, v), r in zip(jobs, pool.map(one_run, *zip(*jobs, strict=True)) if jobs else [], strict=True):
            runs.append(r)
            print(f"{d} seed {s} {v}: acc {r['before']['accuracy']:.4f}->{r['after']['accuracy']:.4f} "
                  f"tprd {r['before']['tprd']:.4f}->{r['after']['tprd']:.4f} ({r['wall_seconds']} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(runs, indent=1))
    runs = [r for r in runs if r["dataset"] in args.datasets
            and r["seed"] in (args.seeds if r.get("variant", "default") == "default" else args.ablation_seeds)]
    write_markdown(summarise(runs), runs, args.out, time.perf_counter() - started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
