"""Eraser against the query budget, side by side with Fairlearn's ThresholdOptimizer; writes docs/eraser.md.

For Adult (sex), COMPAS (race) and German credit (age), criteria dp and eo, query budgets 100, 300,
1000 and all tune rows: Eraser with the group sent at inference and group-free (attribute
estimator), the Adult group-free runs over a model trained without the sex column, and
ThresholdOptimizer (group at inference) over the same reference model and splits. Every method
fits on the tune split only; the test split is scored once, after fitting.

    python benchmarks/eraser_benchmarks.py --out docs/eraser.md [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks.peers import threshold_optimizer
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from peers import threshold_optimizer

from patcher.datasets import load_dataset
from patcher.pipeline import bench

DATASETS = {"adult": "sex", "compas": "race", "german": "age"}
CRITERIA = ("dp", "eo")
BUDGETS: tuple[int | None, ...] = (100, 300, 1000, None)  # None: every tune row
DROP_SENSITIVE = {"adult": (300, 1000, None)}  # group-free runs over a model that never saw the attribute
QUICK = {"datasets": ("german", "compas"), "criteria": ("dp", "eo"), "budgets": (100, None), "drop_sensitive": {}}
METRICS = ("accuracy", "balanced_accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")
PLOT = "img/eraser_queries.png"


@dataclass(frozen=True)
class Job:
    dataset: str
    method: str  # "eraser" | "threshold_optimizer"
    criterion: str
    budget: int | None
    group_free: bool = False
    drop_sensitive: bool = False

    @property
    def variant(self) -> str:
        """What the table's 'bias source / group at inference' column says."""
        if self.method == "threshold_optimizer":
            model = " (model w/o attribute)" if self.drop_sensitive else ""
            return "group thresholds, group at inference" + model
        if self.drop_sensitive:
            return "attribute estimator, no group (model w/o attribute)"
        return "attribute estimator, no group" if self.group_free else "group, group at inference"

    @property
    def short(self) -> str:
        """A few characters for progress lines."""
        name = "TO" if self.method == "threshold_optimizer" else "Eraser"
        tag = "nogroup" if self.group_free else "group"
        return f"{name}/{tag}" + ("/w-o" if self.drop_sensitive else "")

    @property
    def label(self) -> str:
        return "ThresholdOptimizer" if self.method == "threshold_optimizer" else "Eraser"

    def run(self, seed: int) -> dict[str, Any]:
        sensitive = DATASETS[self.dataset]
        if self.method == "threshold_optimizer":
            return threshold_optimizer(self.dataset, sensitive, self.criterion, seed, self.drop_sensitive)
        return bench("eraser", self.dataset, sensitive, self.criterion, self.budget, seed,
                     group_free=self.group_free, drop_sensitive=self.drop_sensitive)


def plan(datasets, criteria, budgets, drop_sensitive) -> tuple[list[Job], list[str]]:
    """The runs, and a note for every budget skipped because the tune split is not larger than it."""
    jobs, skipped = [], []
    for ds in datasets:
        n_tune = len(load_dataset(ds, DATASETS[ds]).tune)
        usable = [b for b in budgets if b is None or b < n_tune]
        if len(usable) < len(budgets):
            cut = ", ".join(str(b) for b in budgets if b is not None and b >= n_tune)
            skipped.append(f"{ds}: the tune split has {n_tune} rows, so budget(s) {cut} would equal 'all' "
                           "and are not run")
        for crit in criteria:
            for gf in (False, True):
                jobs += [Job(ds, "eraser", crit, b, group_free=gf) for b in usable]
            jobs += [Job(ds, "eraser", crit, b, group_free=True, drop_sensitive=True)
                     for b in drop_sensitive.get(ds, ()) if b is None or b < n_tune]
            jobs.append(Job(ds, "threshold_optimizer", crit, None))
            if drop_sensitive.get(ds):
                jobs.append(Job(ds, "threshold_optimizer", crit, None, drop_sensitive=True))
    return jobs, skipped


def run_all(jobs: list[Job], seeds: list[int]) -> list[tuple[Job, dict[str, Any]]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("benchmarks", total=len(jobs) * len(seeds))
        for seed in seeds:
            for job in jobs:
                budget = "all" if job.budget is None else job.budget
                progress.update(task, description=f"{job.dataset} {job.criterion} {job.label} q={budget} s={seed}")
                r = job.run(seed)
                results.append((job, r))
                gap = f"{job.criterion}_diff"
                console.print(f"{job.dataset:6s} {job.criterion} {job.short:14s} q={r['queries_used']:5d}  "
                              f"acc {r['before']['accuracy']:.3f}->{r['after']['accuracy']:.3f}  "
                              f"{gap} {r['before'][gap]:.3f}->{r['after'][gap]:.3f}  fit {r['fit_seconds']:.2f}s",
                              soft_wrap=True, highlight=False)
                progress.advance(task)
    return results


# ---------------------------------------------------------------- aggregation and the report


def aggregate(results: list[tuple[Job, dict[str, Any]]]) -> dict[Job, dict[str, Any]]:
    """Per job: mean and std over seeds of every headline metric, queries and fit time."""
    by_job: dict[Job, list[dict[str, Any]]] = defaultdict(list)
    for job, r in results:
        by_job[job].append(r)
    out = {}
    for job, runs in by_job.items():
        row: dict[str, Any] = {"n_seeds": len(runs), "n_tune": runs[0]["n_tune"], "n_test": runs[0]["n_test"]}
        for side in ("before", "after"):
            for m in METRICS:
                v = np.array([r[side][m] for r in runs])
                row[f"{side}.{m}"], row[f"{side}.{m}.std"] = float(v.mean()), float(v.std())
        row["queries_used"] = float(np.mean([r["queries_used"] for r in runs]))
        row["fit_seconds"] = float(np.mean([r["fit_seconds"] for r in runs]))
        out[job] = row
    return out


def _pair(row: dict[str, Any], metric: str) -> str:
    text = f"{row[f'before.{metric}']:.3f} → {row[f'after.{metric}']:.3f}"
    if row["n_seeds"] > 1:
        text += f" ± {row[f'after.{metric}.std']:.3f}"
    return text


def _order(job: Job) -> tuple:
    budget = float("inf") if job.budget is None else job.budget
    return (CRITERIA.index(job.criterion), job.drop_sensitive, job.method == "threshold_optimizer",
            job.group_free, budget)


def dataset_table(agg: dict[Job, dict[str, Any]], dataset: str) -> list[str]:
    lines = ["| method | bias source / group at inference | criterion | queries used | accuracy | dp_diff "
             "| eo_diff | worst-group accuracy | fit s |",
             "|---|---|---|---:|---|---|---|---|---:|"]
    for job in sorted((j for j in agg if j.dataset == dataset), key=_order):
        row = agg[job]
        queries = f"{row['queries_used']:.0f}" + (" (all)" if job.budget is None else "")
        cells = [job.label, job.variant, job.criterion, queries, _pair(row, "accuracy"), _pair(row, "dp_diff"),
                 _pair(row, "eo_diff"), _pair(row, "worst_group_accuracy"), f"{row['fit_seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison(agg: dict[Job, dict[str, Any]], datasets) -> list[str]:
    """Eraser (every tune row) against ThresholdOptimizer, same model: the criterion's own gap and accuracy."""
    lines = ["| dataset | criterion | ThresholdOptimizer gap / acc | Eraser, group: gap / acc "
             "| Eraser, no group: gap / acc |", "|---|---|---|---|---|"]
    for ds in datasets:
        for crit in CRITERIA:
            to = agg.get(Job(ds, "threshold_optimizer", crit, None))
            eg = agg.get(Job(ds, "eraser", crit, None))
            ef = agg.get(Job(ds, "eraser", crit, None, group_free=True))
            if not (to and eg and ef):
                continue
            gap = f"after.{crit}_diff"
            lines.append(f"| {ds} | {crit} | " + " | ".join(
                f"{r[gap]:.3f} / {r['after.accuracy']:.3f}" for r in (to, eg, ef)) + " |")
    return lines


def flags(agg: dict[Job, dict[str, Any]], datasets) -> list[str]:
    """Facts worth a look, computed from the figures (so they stay true when the figures change)."""
    out = []
    for ds in datasets:
        for job in sorted((j for j in agg if j.dataset == ds), key=_order):
            r, gap = agg[job], f"{job.criterion}_diff"
            q = "all" if job.budget is None else f"{r['queries_used']:.0f}"
            name = f"{ds} {job.criterion}, {job.label} ({job.variant}), {q} queries"
            if r[f"after.{gap}"] > r[f"before.{gap}"]:
                out.append(f"{name}: the patch *widens* {gap} ({r[f'before.{gap}']:.3f} → {r[f'after.{gap}']:.3f}).")
            drop = r["before.accuracy"] - r["after.accuracy"]
            if drop > 0.03 + 1e-9:
                out.append(f"{name}: accuracy falls by {drop:.3f} (more than Eraser's 0.03 cap on tune).")
            if abs(r["after.balanced_accuracy"] - 0.5) < 1e-9 and r["after.dp_diff"] == 0.0:
                out.append(f"{name}: the patched rule gives every test row the same decision (balanced accuracy "
                           "0.5, all gaps 0): a trivially 'fair' constant classifier.")
            elif r["after.worst_group_accuracy"] == 0.0:
                out.append(f"{name}: a (group, label) cell is never classified correctly (worst-group accuracy 0): "
                           "every row of that group and label gets the wrong decision.")
        for crit in CRITERIA:
            to = agg.get(Job(ds, "threshold_optimizer", crit, None))
            if to is None:
                continue
            gap = f"after.{crit}_diff"
            for gf in (False, True):
                er = agg.get(Job(ds, "eraser", crit, None, group_free=gf))
                if er is not None and er[gap] > to[gap] + 0.005:
                    out.append(f"{ds} {crit}: Eraser ({'no group' if gf else 'group'}, all queries) leaves a larger "
                               f"{crit}_diff than ThresholdOptimizer ({er[gap]:.3f} vs {to[gap]:.3f}; accuracy "
                               f"{er['after.accuracy']:.3f} vs {to['after.accuracy']:.3f}).")
    return out


def plot(agg: dict[Job, dict[str, Any]], datasets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = {"dp": "tab:blue", "eo": "tab:orange"}
    styles = {(False, False): ("-", "o", 8), (True, False): ("--", "s", 5), (True, True): (":", "^", 6)}
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.6 * len(datasets), 7.2), squeeze=False)
    for col, ds in enumerate(datasets):
        gap_ax, acc_ax = axes[0, col], axes[1, col]
        for crit in CRITERIA:
            c = colours[crit]
            for (gf, drop), (ls, marker, size) in styles.items():
                jobs = sorted((j for j in agg if j.dataset == ds and j.method == "eraser" and j.criterion == crit
                               and j.group_free == gf and j.drop_sensitive == drop), key=_order)
                if not jobs:
                    continue
                q = [agg[j]["queries_used"] for j in jobs]
                gap_ax.plot(q, [agg[j][f"after.{crit}_diff"] for j in jobs], ls=ls, marker=marker, ms=size, color=c)
                acc_ax.plot(q, [agg[j]["after.accuracy"] for j in jobs], ls=ls, marker=marker, ms=size, color=c)
            base = next((agg[j] for j in agg if j.dataset == ds and j.criterion == crit and not j.drop_sensitive), None)
            if base is not None:
                gap_ax.axhline(base[f"before.{crit}_diff"], color=c, lw=0.8, alpha=0.45)
                if crit == CRITERIA[0]:
                    acc_ax.axhline(base["before.accuracy"], color="grey", lw=0.8, alpha=0.6)
            to = agg.get(Job(ds, "threshold_optimizer", crit, None))
            if to is not None:
                gap_ax.axhline(to[f"after.{crit}_diff"], color=c, ls="-.", lw=1.4)
                acc_ax.axhline(to["after.accuracy"], color=c, ls="-.", lw=1.4)
        n_test = next(agg[j]["n_test"] for j in agg if j.dataset == ds)
        gap_ax.set_title(f"{ds} ({DATASETS[ds]}), test n={n_test}")
        for ax in (gap_ax, acc_ax):
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.25)
            ax.set_xlabel("queries to the model (tune rows scored)")
        gap_ax.set_ylim(bottom=0)
        gap_ax.set_ylabel("fairness gap on test (dp_diff / eo_diff)")
        acc_ax.set_ylabel("accuracy on test")
    handles = [Line2D([], [], color=colours[c], lw=2, label=f"criterion {c} (gap shown: {c}_diff)") for c in CRITERIA]
    handles += [
        Line2D([], [], color="k", ls="-", marker="o", label="Eraser, group at inference"),
        Line2D([], [], color="k", ls="--", marker="s", label="Eraser, no group (estimator)"),
        Line2D([], [], color="k", ls="-.", lw=1.4, label="ThresholdOptimizer (all tune rows, group at inference)"),
        Line2D([], [], color="grey", lw=0.8, label="unpatched model"),
    ]
    if any(j.drop_sensitive and j.method == "eraser" for j in agg):
        handles.insert(4, Line2D([], [], color="k", ls=":", marker="^",
                                 label="Eraser, no group, model trained w/o the attribute"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(agg, datasets, skipped: list[str], command: str, seconds: float, seeds: list[int], quick: bool) -> str:
    import fairlearn

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count()
    n = {ds: (next(agg[j]["n_tune"] for j in agg if j.dataset == ds), next(agg[j]["n_test"] for j in agg
                                                                          if j.dataset == ds)) for ds in datasets}
    sizes = ", ".join(f"{ds} {t} tune / {s} test" for ds, (t, s) in n.items())
    seed_note = ("one seed" if len(seeds) == 1 else f"{len(seeds)} seeds, mean ± std (of the after value) "
                 "over seeds") + f" ({', '.join(map(str, seeds))}); the seed sets the reference model's training "
    seed_note += "and the method's randomness (query rows, ThresholdOptimizer's randomised thresholds)."
    out = [
        "# Benchmarks: Eraser vs. the query budget, and Fairlearn's ThresholdOptimizer",
        "",
        "What is compared: the Inference-Time Rule Eraser (`patcher.methods.eraser`), with the sensitive group "
        "sent at inference and group-free (an attribute estimator q(a|x) trained on the tune split's group "
        "labels), at query budgets of 100, 300, 1000 and all tune rows, against Fairlearn's `ThresholdOptimizer` "
        "(`prefit=True`, objective accuracy, constraint `demographic_parity` for dp and `equalized_odds` for eo; "
        "it scores every tune row and needs the group at inference). All methods patch the same frozen "
        "reference model (a torch MLP exported to ONNX) on the same deterministic splits. Every method fits on "
        "the tune split only, through a counting oracle; **the test split is never seen by any method** and is "
        "scored once, after fitting. All figures below are test-split figures.",
        "",
        "## How this was produced",
        "",
        f"- Command: `{command}`" + (" (**quick subset**)" if quick else ""),
        f"- Date: {date}; commit `{_commit()}`; fairlearn {fairlearn.__version__}; Python {platform.python_version()}",
        f"- Machine: {cores}-core CPU, no GPU (shared with other work). Wall time of the whole run: {seconds:.0f} s, "
        "reference-model training included where a model was not cached yet.",
        f"- Seeds: {seed_note}",
        f"- Split sizes: {sizes}. Adult's test split is its official test file; COMPAS and German are split "
        "60/20/20, stratified by (group, label).",
        "- **German credit's test split has only 200 rows** (about 30-40 in the younger group, fewer per "
        "(group, label) cell): one row changes accuracy by 0.005 and a group's rates by up to ~0.03, so its "
        "figures are noisy and small differences there mean nothing.",
    ]
    out += [f"- Skipped: {s}." for s in skipped]
    out += [
        "",
        "Columns: `before → after` on the test split (before = the unpatched model). dp_diff = max-min selection "
        "rate over groups; eo_diff = max(TPR gap, FPR gap) (Fairlearn's definitions); worst-group accuracy is "
        "the minimum over (group, label) cells. `queries used` = distinct tune rows sent to the model: it can be "
        "below the budget, since a duplicated feature row is paid for once (COMPAS's tune split has many "
        "duplicates) and the stratified pick rounds per (group, label) cell. "
        "'model w/o attribute' rows patch a different model (trained without the sensitive column), so their "
        "`before` differs. Fit seconds exclude the evaluation and model training.",
        "",
        f"![Fairness gap and accuracy against the number of queries]({PLOT})",
        "",
        f"[Figure: fairness gap (top) and accuracy (bottom) on test against queries, log scale]({PLOT}). "
        "Dash-dot horizontal lines: ThresholdOptimizer on all tune rows; thin lines: the unpatched model.",
        "",
        "## Eraser on every tune row vs. ThresholdOptimizer (criterion's own gap / accuracy, test split)",
        "",
        *comparison(agg, datasets),
        "",
    ]
    for ds in datasets:
        t, s = n[ds]
        out += [f"## {ds} (sensitive: {DATASETS[ds]}; {t} tune rows, {s} test rows)", "", *dataset_table(agg, ds), ""]
    found = flags(agg, datasets)
    if found:
        out += ["## Flags (computed from the figures above)", "", *[f"- {f}" for f in found], ""]
    out += [
        "## Notes",
        "",
        "- ThresholdOptimizer's predictions are randomised between two thresholds per group; they are drawn with "
        "`random_state=seed`, so every run reproduces.",
        "- Eraser's operating point (alpha, threshold) is tuned on the tune split under a maximum accuracy drop "
        "of 0.03 (its default), so it may stop short of a zero gap where that would cost more accuracy; "
        "ThresholdOptimizer has no such cap.",
        "- Regenerate: `make docs` (or the command above). `benchmarks/peers.py` holds the ThresholdOptimizer "
        "wrapper; `benchmarks/dp_frontier.py` gives the hindsight bound for group-threshold rules.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown to write (default docs/eraser.md; with --quick a temporary folder)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quick", action="store_true", help="german and compas, budgets 100 and all, no adult")
    ap.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    args = ap.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "fairpatch_bench_quick" / "eraser.md" if args.quick
                    else Path("docs/eraser.md"))
    cfg = QUICK if args.quick else {"datasets": tuple(DATASETS), "criteria": CRITERIA, "budgets": BUDGETS,
                                    "drop_sensitive": DROP_SENSITIVE}
    command = "python benchmarks/eraser_benchmarks.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    jobs, skipped = plan(cfg["datasets"], cfg["criteria"], cfg["budgets"], cfg["drop_sensitive"])
    results = run_all(jobs, args.seeds)
    seconds = time.perf_counter() - started
    agg = aggregate(results)
    plot(agg, cfg["datasets"], args.out.parent / PLOT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(agg, cfg["datasets"], skipped, command.strip(), seconds, args.seeds, args.quick))
    if args.json:
        args.json.write_text(json.dumps([{"job": job.__dict__, **r} for job, r in results], indent=1))
    print(f"wrote {args.out} and {args.out.parent / PLOT} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
