"""Fairness triggers (Fairness Reprogramming) side by side with Eraser and Fairlearn's ThresholdOptimizer.

Writes docs/triggers.md and docs/img/trigger_lambda.png. Every method is fitted on the tune split and
scored on the same held-out test split. Rows: Adult (sex) dp and eo with gradient and zeroth-order access,
colored digits (color) eo with the default color-mix trigger and with the earlier replaced frame (seed 0), the
default on the reference CNNs of seeds 0-9 (0-6: development seeds, 7-9: fresh, run once after the settings were
frozen), the transfer setting (a trigger fitted against the seed-0 reference model, scored on the seed-1 model)
and the lambda sweeps (accuracy-fairness curves).

    .venv/bin/python benchmarks/trigger_benchmarks.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from patcher.pipeline import bench  # noqa: E402


def bench_trigger(dataset, sensitive, criterion, access, queries, seed, **kwargs):
    return bench("trigger", dataset, sensitive, criterion, queries, seed, access=access, **kwargs)


def bench_eraser(dataset, sensitive, criterion, queries, seed):
    return bench("eraser", dataset, sensitive, criterion, queries, seed)


def sweep_lam(dataset, sensitive, criterion, access, queries, seed):
    return bench("trigger", dataset, sensitive, criterion, queries, seed, access=access, sweep_lam=True)

KEYS = ("accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")
DEV_SEEDS = (0, 1, 2, 3, 4, 5, 6)  # the frame's settings were chosen while looking at their test figures
FRESH_SEEDS = (7, 8, 9)  # run once, after the color-mix settings were frozen on held-out tune rows
SMALL_BUDGET_SEEDS = (0, 1, 2)  # Adult dp, zeroth order, 10,000 queries: run once after the tabular settings froze


def fmt_row(name: str, dataset: str, criterion: str, queries, before: dict, after: dict, extra: str = "") -> str:
    b, a = before, after
    return (f"| {dataset} | {criterion} | {name} | {queries} | {b['accuracy']:.4f} → {a['accuracy']:.4f} | "
            f"{b['dp_diff']:.4f} → {a['dp_diff']:.4f} | {b['eo_diff']:.4f} → {a['eo_diff']:.4f} | "
            f"{b['worst_group_accuracy']:.4f} → {a['worst_group_accuracy']:.4f} | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the zeroth-order lambda sweep")
    parser.add_argument("--out", default=str(ROOT / "docs" / "triggers.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows, results = [], {}
    for criterion in ("dp", "eo"):
        for access in ("gradient", "zeroth_order"):
            r = bench_trigger("adult", "sex", criterion, access, 50_000, 0, transfer_seed=1 if access == "gradient"
                              else None)
            results[f"adult-{criterion}-{access}"] = r
            rows.append(fmt_row(f"trigger, {access}", "adult", criterion, r["queries_used"], r["before"], r["after"],
                                f"lam {r['lam']:g}, threshold {r['threshold']:.3f}, fit {r['fit_seconds']:.1f}s"))
            print(rows[-1], flush=True)
        e = bench_eraser("adult", "sex", criterion, 1000, 0)
        results[f"adult-{criterion}-eraser"] = e
        rows.append(fmt_row("Eraser (group at inference)", "adult", criterion, e["queries_used"], e["before"],
                            e["after"], f"alpha {e['alpha']:.3f}"))
        try:
            from peers import threshold_optimizer

            t = threshold_optimizer("adult", "sex", criterion, 0)
            results[f"adult-{criterion}-threshold_optimizer"] = t
            rows.append(fmt_row("Fairlearn ThresholdOptimizer (group at inference)", "adult", criterion,
                                t.get("queries_used", "all tune rows"), t["before"], t["after"]))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not hidden
            rows.append(f"| adult | {criterion} | Fairlearn ThresholdOptimizer | - | failed: {exc} | | | | |")
        print(rows[-1], flush=True)
    for seed in SMALL_BUDGET_SEEDS:  # issue 16: the zeroth-order trigger with 10,000 queries (notes only)
        results[f"adult-dp-zeroth_order-10k-seed{seed}"] = bench_trigger("adult", "sex", "dp", "zeroth_order",
                                                                         10_000, seed)
    for form in (None, "frame"):  # the default (color mix), then the earlier replaced frame for comparison
        for access in ("gradient", "zeroth_order"):
            r = bench_trigger("colored-digits", None, "eo", access, 50_000, 0,
                              transfer_seed=None if form else 1, **({"trigger": form} if form else {}))
            results[f"colored-digits-eo-{access}" + (f"-{form}" if form else "")] = r
            label = f"trigger, {access}" + (" (earlier default: frame)" if form else "")
            rows.append(fmt_row(label, "colored-digits", "eo", r["queries_used"], r["before"], r["after"],
                                f"lam {r['lam']:g}, {r['trigger']['form']} ({r['trigger']['dim']} parameters), "
                                f"threshold {r['threshold']:.3f}, fit {r['fit_seconds']:.1f}s, {goal(r)}"))
            print(rows[-1], flush=True)

    seed_rows = []  # colored digits on the reference CNNs of other seeds: how much of seed 0 is luck
    for seed in (*DEV_SEEDS, *FRESH_SEEDS):
        kind = "development" if seed in DEV_SEEDS else "fresh"
        for access in ("gradient", "zeroth_order"):
            key = f"colored-digits-eo-{access}"
            r = results[key] if seed == 0 else bench_trigger("colored-digits", None, "eo", access, 50_000, seed)
            results[f"{key}-seed{seed}"] = r
            seed_rows.append(fmt_row(f"trigger, {access}, seed {seed} ({kind})", "colored-digits", "eo",
                                     r["queries_used"], r["before"], r["after"],
                                     f"lam {r['lam']:g}, threshold {r['threshold']:.3f}, fit {r['fit_seconds']:.0f}s, "
                                     f"{goal(r)}{selection_note(r)}"))
            print(seed_rows[-1], flush=True)

    transfer_rows = []
    for key, r in results.items():
        if "transfer" in r and "-seed" not in key:
            t = r["transfer"]
            transfer_rows.append(fmt_row(f"trigger, {r['access']} (fitted on seed 0)", r["dataset"], r["criterion"],
                                         "-", t["before"], t["after"], f"scored on the seed-{t['seed']} model"))

    sweeps = {"gradient": sweep_lam("adult", "sex", "dp", "gradient", None, 0)}
    if not args.quick:
        sweeps["zeroth_order"] = sweep_lam("adult", "sex", "dp", "zeroth_order", 50_000, 0)
    plot(sweeps, ROOT / "docs" / "img" / "trigger_lambda.png", results)
    write_doc(Path(args.out), rows, transfer_rows, sweeps, notes(results), digits_candidates(results), seed_rows)
    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    print(json.dumps({k: {"after": v["after"], "before": v["before"]} for k, v in results.items()}, indent=1))


def plot(sweeps: dict, path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for access, sw in sweeps.items():
        xs = [p["dp_diff"] for p in sw["curve"]]
        ys = [p["accuracy"] for p in sw["curve"]]
        ax.plot(xs, ys, "o-", label=f"trigger, {access}")
        for p in sw["curve"]:
            ax.annotate(f"{p['lam']:g}", (p["dp_diff"], p["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    b = next(iter(sweeps.values()))["before"]
    ax.plot([b["dp_diff"]], [b["accuracy"]], "ks", label="reference model")
    for key, marker in (("adult-dp-eraser", "^"), ("adult-dp-threshold_optimizer", "v")):
        if key in results:
            a = results[key]["after"]
            ax.plot([a["dp_diff"]], [a["accuracy"]], marker, label=key.split("-")[-1] + " (group at inference)")
    ax.set_xlabel("dp_diff (test split)")
    ax.set_ylabel("accuracy (test split)")
    ax.set_title("Adult (sex): trigger accuracy vs dp over lambda (labels: lambda)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def goal(r: dict) -> str:
    """Issue 4's colored-digits goal for one run: eo_diff at least halved and worst-group accuracy up."""
    b, a = r["before"], r["after"]
    ok = a["eo_diff"] <= b["eo_diff"] / 2 and a["worst_group_accuracy"] > b["worst_group_accuracy"]
    return "goal met" if ok else "goal NOT met"


def selection_note(r: dict) -> str:
    """Say when the held-out unfairness target of the worst-cell rule was out of reach (the least unfair
    point was kept instead)."""
    sel = r.get("selection") or {}
    return ", held-out eo target NOT reached (least unfair point kept)" if sel.get("target_met") is False else ""


def seed_summary(results: dict) -> list[str]:
    """Which colored-digits rows meet issue 4's goal, per access, development and fresh seeds apart."""
    out = []
    for access in ("gradient", "zeroth_order"):
        parts = []
        for label, seeds in (("development seeds 0-6", DEV_SEEDS), ("fresh seeds 7-9", FRESH_SEEDS)):
            rs = [(s, results[f"colored-digits-eo-{access}-seed{s}"]) for s in seeds
                  if f"colored-digits-eo-{access}-seed{s}" in results]
            met = [s for s, r in rs if goal(r) == "goal met"]
            parts.append(f"{label}: {len(met)} of {len(rs)}")
        out.append(f"- Colored digits, {access}, default settings: goal met on " + "; ".join(parts) + ".")
    gaps = [(s, r["tune_after"]["eo"], r["after"]["eo_diff"]) for s in (*DEV_SEEDS, *FRESH_SEEDS)
            if (r := results.get(f"colored-digits-eo-gradient-seed{s}"))]
    if gaps:
        out.append("- The out-of-fold eo_diff of the chosen gradient point (all tune rows, 2 folds) against its test "
                   "eo_diff, seeds " + ", ".join(f"{s}: {h:.3f} / {t:.3f}" for s, h, t in gaps) + ".")
    return out


def notes(results: dict) -> list[str]:
    """What the figures say, checked against the issue's targets (computed, so they follow the tables)."""
    out = []
    for access in ("gradient", "zeroth_order"):
        r = results.get(f"adult-dp-{access}")
        if r:
            drop = r["before"]["accuracy"] - r["after"]["accuracy"]
            target = (0.03, 0.02) if access == "gradient" else (0.05, 0.025)
            ok = r["after"]["dp_diff"] <= target[0] and drop <= target[1]
            out.append(f"- Adult dp, {access}: dp_diff {r['after']['dp_diff']:.4f} at an accuracy drop of "
                       f"{100 * drop:.2f} points with {r['queries_used']} queries (target dp <= {target[0]}, drop <= "
                       f"{100 * target[1]:.1f} points): {'met' if ok else 'NOT met'}.")
    small = [results[k] for k in (f"adult-dp-zeroth_order-10k-seed{s}" for s in SMALL_BUDGET_SEEDS) if k in results]
    if small:
        dps = [r["after"]["dp_diff"] for r in small]
        drops = [100 * (r["before"]["accuracy"] - r["after"]["accuracy"]) for r in small]
        met = sum(d <= 0.05 and p <= 2.0 for d, p in zip(dps, drops, strict=True))
        out.append(f"- Adult dp, zeroth_order, 10,000 queries, seeds {', '.join(str(r['seed']) for r in small)} "
                   "(issue 16's target: dp <= 0.05 within 2 points): " + "; ".join(
                       f"seed {r['seed']}: dp {d:.4f} at {p:.2f} points" for r, d, p in zip(small, dps, drops,
                                                                                          strict=True))
                   + f"; mean dp {sum(dps) / len(dps):.4f} at {sum(drops) / len(drops):.2f} points; met on {met} of "
                   f"{len(small)}. Settings, protocol and the hindsight bound: docs/triggers_zo_dev.md.")
    for access in ("gradient", "zeroth_order"):
        r = results.get(f"colored-digits-eo-{access}")
        if r:
            b, a = r["before"], r["after"]
            halved = a["eo_diff"] <= b["eo_diff"] / 2
            up = a["worst_group_accuracy"] > b["worst_group_accuracy"]
            out.append(f"- Colored digits eo, {access}: eo_diff {b['eo_diff']:.4f} -> {a['eo_diff']:.4f} "
                       f"({'halved' if halved else 'NOT halved'}), worst-group accuracy "
                       f"{b['worst_group_accuracy']:.4f} -> {a['worst_group_accuracy']:.4f} "
                       f"({'up' if up else 'NOT up'}).")
    out.append("- The dp triggers widen eo_diff on Adult (the same happens to ThresholdOptimizer's dp rule): dp and eo "
               "pull apart when base rates differ; use `--criterion eo` for eo.")
    out.append(
        "- Colored digits, why a color mix: the sensitive attribute is a tint of the whole image (every stroke pixel "
        "is its gray level times the group's color), so a 3x3 channel mix plus a per-channel offset applied at every "
        "pixel (`-o trigger=color`, 12 parameters, the identity at the start; exported as one ONNX 1x1 Conv over any "
        "spatial rank) can send both hues to one colour. A frame cannot: the reference CNN pools its last features "
        "globally (max), so a frame reaches the decision only by raising a feature's maximum, a floor shared by "
        "every image, and it floors digit evidence along with colour evidence.")
    out.append(
        "- The caveat: this works because the attribute is a global hue in this constructed task. On real images "
        "(a face attribute, say) a colour mix will not remove the attribute; the colored-digits defaults are the "
        "only place it is on, and the frame, the paper's added border and the corner patch remain "
        "(`-o trigger=frame|border|patch`).")
    frame = {a: results.get(f"colored-digits-eo-{a}-frame") for a in ("gradient", "zeroth_order")}
    if all(frame.values()):
        out.append("- The earlier default, the replaced frame (seed 0, rows 'earlier default: frame'): gradient eo "
                   f"{frame['gradient']['after']['eo_diff']:.4f}, worst cell "
                   f"{frame['gradient']['after']['worst_group_accuracy']:.4f}, accuracy "
                   f"{frame['gradient']['after']['accuracy']:.4f}; zeroth order eo "
                   f"{frame['zeroth_order']['after']['eo_diff']:.4f}, worst cell "
                   f"{frame['zeroth_order']['after']['worst_group_accuracy']:.4f}, accuracy "
                   f"{frame['zeroth_order']['after']['accuracy']:.4f}. Over seeds 0-9 it met the goal on 7 of 10 with "
                   "gradients and on 2 of 10 from queries (per-seed figures in docs/triggers_zo_dev.md).")
    out += [
        "- How the color-mix settings were chosen (docs/triggers_zo_dev.md): on held-out tune rows only. Test "
        "figures of seeds 0-6 had been seen for the frame defaults, never for the color mix; the form and 8 "
        "zeroth-order settings were compared by the chosen point's held-out worst cell (all 0.937-0.949 on "
        "average, against 0.763 for the frame), and the gradient path changed only its form, judged on out-of-fold "
        "tune figures. Seeds 7-9 were then run once. Zeroth order with the color mix: q = 2 antithetic pairs on "
        "stratified batches of 64 rows at lam 20, mu 0.3, step 0.1.",
        "- Selection, both access kinds (`select` worst_cell): among the candidates (gradient: lambda in 2, 5, 10, 20; "
        "zeroth order: the evaluated triggers) and thresholds, the best worst (color, label) cell accuracy on the "
        "selection rows among the points whose eo_diff there is at most half the model's; with no point under "
        "that target the least unfair one is kept and the fit reports `selection.target_met` false. Gradient access "
        "selects on out-of-fold scores of every tune row (`select_folds` 2: per lambda, a trigger trained on one "
        "half scores the other; the chosen lambda is then retrained on all rows), zeroth order on 30% of the "
        "tune rows held out of training. The small-batch bias of the squared gap is removed for zeroth order "
        "(`zo_unbiased_gap`): on batches of a few rows per cell it rewards pushing every score in a cell the same "
        "way.",
        "- Smaller budgets (zeroth order, default settings, seeds 0-9, after the settings were frozen): 20,000 "
        "queries met the goal on 10 of 10 seeds, 10,000 on 8 of 10 (docs/triggers_zo_dev.md).",
    ]
    out += seed_summary(results)
    for key, r in results.items():
        if "transfer" in r and "-seed" not in key:
            t, crit = r["transfer"], f"{r['criterion']}_diff"
            out.append(f"- Transfer, {key}: on the seed-{t['seed']} model {crit} {t['before'][crit]:.4f} -> "
                       f"{t['after'][crit]:.4f}, accuracy {t['before']['accuracy']:.4f} -> "
                       f"{t['after']['accuracy']:.4f} (the re-tuned threshold belongs to the seed-0 model).")
    return out


def digits_candidates(results: dict) -> list[str]:
    """The colored-digits candidates as the fit saw them: held-out tune rows (cell-balanced accuracy)."""
    lines = []
    for access in ("gradient", "zeroth_order"):
        r = results.get(f"colored-digits-eo-{access}")
        if not r:
            continue
        key = "lam" if access == "gradient" else "step"
        worst = all("worst_cell_accuracy" in c for c in r["candidates"])
        lines += [f"{access} (before: balanced accuracy {r['tune_before']['accuracy']:.4f}, eo "
                  f"{r['tune_before']['eo']:.4f} on the same rows):", "",
                  f"| {key} | balanced accuracy | eo_diff |{' worst cell |' if worst else ''} threshold |",
                  "|---|---|---|---|" + ("---|" if worst else "")]
        lines += [f"| {c[key]:g} | {c['accuracy']:.4f} | {c['unfairness']:.4f} |"
                  + (f" {c['worst_cell_accuracy']:.4f} |" if worst else "") + f" {c['threshold']:.3f} |"
                  for c in r["candidates"]]
        lines.append("")
    return lines


def write_doc(path: Path, rows: list[str], transfer_rows: list[str], sweeps: dict, note_lines: list[str],
              candidate_lines: list[str], seed_rows: list[str]) -> None:
    head = ("| dataset | criterion | method | queries | accuracy | dp_diff | eo_diff | worst-group acc | notes |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [
        "# Fairness triggers (Fairness Reprogramming)",
        "",
        f"Produced by `python benchmarks/trigger_benchmarks.py` on {dt.date.today().isoformat()} (2-core CPU, "
        "1 torch thread). Every method is fitted on the tune split and scored on the held-out test split it never "
        "saw; before = the reference model at its default threshold. The trigger needs no group at inference: "
        "it is an input transform (`x * mask + delta` over the inputs for tables; for images a colour mix, a frame, "
        "a border or a corner patch) "
        "plus, for binary tasks, a re-tuned decision threshold, both chosen on the tune split. Eraser and "
        "ThresholdOptimizer read the group at inference. `fairpatch bench trigger ... --json` reproduces any row.",
        "",
        "How it learns (patcher/methods/reprogram*.py): gradient access backpropagates through the model's ONNX "
        "artifact (onnx2torch) and trains one trigger per lambda in (1, 2, 5, 10), keeping the fairest within "
        "1.5 points of tune accuracy; zeroth-order access sees scores only. Tables (default, `zo_surrogate`): the "
        "queries buy a copy of the model (its scores on a quarter of the budget in tuning rows, and on another "
        "quarter of rows whose 6 group-correlated columns are moved at random), a small MLP is fitted to them, one "
        "trigger per lambda in (5, 10) is trained on the copy with gradients, and the rest of the budget scores "
        "both triggers on the real model, on the same rows as the model's own scores (2,500 each at 10,000 "
        "queries), where the most accurate candidate and threshold with dp at most 0.03 within 2 points is kept. "
        "Images, or tables with `-o zo_surrogate=false`: antithetic randomized gradient estimates (q = 2 pairs, "
        "mu = 0.05) on one minibatch per step (tabular: 64 rows, step 0.1, weighed back "
        "to the population, the gap of soft decisions at the cut that accepts the label rate, lam 3; images: 128 "
        "rows, step 0.05) (common random numbers), a low-dimensional "
        "trigger (the 6 input columns most correlated with the group: scale and offset each, 12 parameters; "
        "images: see below), every row counted by the oracle; among the evaluated triggers and thresholds, "
        "tabular keeps the most accurate with dp at most 0.03 on the evaluation rows within 2.5 points (else the "
        "least unfair).",
        "",
        "Colored digits (the trigger method's `colored-digits` preset, `fairpatch methods show trigger`): "
        "the trigger is a global colour mix "
        "(`color`: `x~[:, c] = sum_k A[c, k] x[:, k] + b[c]` at every pixel, 12 parameters, the identity at the "
        "start); the utility loss and the accuracy that selects weigh the four (color, label) cells equally "
        "(`balance`); lambda in (2, 5, 10, 20) and the threshold are chosen, with gradient access, on out-of-fold "
        "scores of every tune row (`select_folds` 2), with zeroth order on 30% of the tune rows held out of "
        "training (`holdout`): the best worst (color, label) cell accuracy there among the points whose eo_diff "
        "there is at most half the model's (`select` worst_cell). Zeroth order: q = 2 antithetic pairs on "
        "stratified batches of 64 rows at lam 20, with the small-batch bias of the gap removed. `-o trigger=frame` "
        "gives the earlier default (a 2-pixel replaced frame, 336 parameters, and its zeroth-order search).",
        "",
        "## Results (seed 0)",
        "",
        head, *rows,
        "",
        "## What the figures say",
        "",
        *note_lines,
        "",
        "## Colored digits: the candidates on the held-out tune rows",
        "",
        "What the selection saw (gradient: every tune row, each scored by the fold trigger that did not train on it; "
        "zeroth order: 30% of the tune split, never trained on; accuracy balanced over the four cells, each "
        "candidate at its own re-tuned threshold). The minority cells are small (about 144 rows each out of fold, "
        "about 40 in the holdout).",
        "",
        *candidate_lines,
        "## Colored digits on other seeds",
        "",
        "The default settings on the reference CNNs trained with seeds 0-9 (`--seed`: the model changes, the "
        "splits do not). Issue 4's goal per row: eo_diff at least halved and worst-group accuracy up (worst "
        "(color, label) cell, test split). Seeds 0-6 are development seeds: their test figures were seen while "
        "the earlier frame defaults were developed (never for the colour mix, whose settings were chosen on "
        "held-out tune rows); seeds 7-9 were run once, after the colour-mix settings were frozen.",
        "",
        head, *seed_rows,
        "",
        "## Transfer: a trigger fitted against one reference model, scored on another (trained with seed 1)",
        "",
        head, *transfer_rows,
        "",
        "## Lambda: the accuracy-fairness curve (Adult, sex, dp, test split)",
        "",
        "Each point is one trigger with its own re-tuned threshold (within 1.5 points of tune accuracy), so even "
        "lam 0 moves dp: there the threshold does the work.",
        "",
        "![trigger lambda curve](img/trigger_lambda.png)",
        "",
    ]
    for access, sw in sweeps.items():
        lines += [f"{access} (`fairpatch bench trigger --dataset adult --criterion dp --access {access} "
                  f"--sweep-lam`):", "",
                  "| lam | accuracy | dp_diff | eo_diff | worst-group acc | threshold | queries |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['lam']:g} | {p['accuracy']:.4f} | {p['dp_diff']:.4f} | {p['eo_diff']:.4f} | "
                  f"{p['worst_group_accuracy']:.4f} | {p['threshold']:.3f} | {p['queries_used']} |"
                  for p in sw["curve"]]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
