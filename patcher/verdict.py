"""Did a patch improve its criterion on held-out rows? A paired bootstrap of the gap's change.

The rows are resampled within each group (group sizes kept), and the same resample scores the decisions
before and after the patch, so the interval is of the change itself, not of two gaps compared. Verdicts:
`improved` (the interval is below 0), `not improved` (the gap did not go down at all), `inconclusive`
(it went down, but the interval reaches 0 or above).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patcher.metrics import CRITERION_RATES


def _gaps(counts: np.ndarray, criterion: str) -> np.ndarray:
    """counts [B, G, 2 labels, 2 decisions] -> the criterion's gap per resample [B]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = counts.sum(axis=(2, 3))
        rates = {"sr": counts[..., 1].sum(axis=2) / rows,
                 "tpr": counts[:, :, 1, 1] / counts[:, :, 1, :].sum(-1),
                 "fpr": counts[:, :, 0, 1] / counts[:, :, 0, :].sum(-1)}
    gaps = []
    for k in CRITERION_RATES[criterion]:
        r = rates[k]
        gaps.append(np.nan_to_num(np.nanmax(np.where(np.isnan(r), -np.inf, r), 1)
                                  - np.nanmin(np.where(np.isnan(r), np.inf, r), 1), posinf=0.0, neginf=0.0))
    g = np.max(gaps, axis=0)
    return np.where(np.isfinite(g) & (np.sum(~np.isnan(rates[CRITERION_RATES[criterion][0]]), 1) >= 2), g, 0.0)


def held_out_verdict(y: np.ndarray, before: np.ndarray, after: np.ndarray, groups: np.ndarray, n_groups: int,
                     criterion: str, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                     weights: np.ndarray | None = None, strata: np.ndarray | None = None) -> dict[str, Any]:
    """The `held_out` block of a job result: the criterion's gap before and after, the change with its
    percentile-bootstrap interval, and the verdict. `before` and `after` are class decisions (1 = positive).
    `weights` (e.g. inverse sampling probabilities of rows drawn stratified by group and label) make the
    rates population estimates. Resampling keeps the size of each stratum: the groups by default; for rows drawn
    stratified by (group, label), pass those cells, or the bootstrap would also vary the label mix that the
    design fixed."""
    y = (np.asarray(y) == 1).astype(np.int64)
    groups = np.asarray(groups, np.int64)
    codes = [groups * 4 + y * 2 + (np.asarray(d) == 1).astype(np.int64) for d in (before, after)]
    size = n_groups * 4

    def counts(idx: np.ndarray) -> list[np.ndarray]:  # idx [B, n]
        B = idx.shape[0]
        offset = (np.arange(B) * size)[:, None]
        wb = None if weights is None else np.broadcast_to(np.asarray(weights, float)[idx], idx.shape).ravel()
        return [np.bincount((c[idx] + offset).ravel(), weights=wb, minlength=B * size).reshape(B, n_groups, 2, 2)
                for c in codes]

    full = np.arange(len(y))[None, :]
    gap_before, gap_after = (float(_gaps(c, criterion)[0]) for c in counts(full))
    rng = np.random.default_rng(seed)
    strata = groups if strata is None else np.asarray(strata)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    changes = []
    for start in range(0, n_boot, 100):  # batches keep the [B, n] index arrays small
        b = min(100, n_boot - start)
        idx = np.concatenate([m[rng.integers(0, len(m), size=(b, len(m)))] for m in members if len(m)], axis=1)
        cb, ca = counts(idx)
        changes.append(_gaps(ca, criterion) - _gaps(cb, criterion))
    change = np.concatenate(changes)
    lo, hi = (float(np.quantile(change, q)) for q in ((1 - level) / 2, (1 + level) / 2))
    delta = gap_after - gap_before
    verdict = "improved" if hi < 0 else "not improved" if delta >= 0 else "inconclusive"
    return {"criterion": criterion, "rows": int(len(y)), "gap_before": round(gap_before, 6),
            "gap_after": round(gap_after, 6), "change": round(delta, 6),
            "change_ci": [round(lo, 6), round(hi, 6)], "ci_level": level, "n_boot": n_boot, "verdict": verdict}


def warning(v: dict[str, Any]) -> str | None:
    """The fit report's words for a patch that did not improve its criterion (None when it did)."""
    if v["verdict"] == "improved":
        return None
    lo, hi = v["change_ci"]
    if v["verdict"] == "not improved":
        return (f"this patch did not improve {v['criterion']} on the {v['rows']} held-out rows: the gap went from "
                f"{v['gap_before']:.3f} to {v['gap_after']:.3f} (change {v['change']:+.3f}, 95% CI [{lo:+.3f}, "
                f"{hi:+.3f}]); activating it is refused unless forced. Try a larger query budget or another method")
    return (f"the {v['criterion']} gap went from {v['gap_before']:.3f} to {v['gap_after']:.3f} on the {v['rows']} "
            f"held-out rows, but the 95% CI of the change [{lo:+.3f}, {hi:+.3f}] does not exclude no improvement")


def default_guard(criterion: str) -> float:
    """The one-sided confidence a method's cross-fitted guard asks by default: 0.9 for eo and eopp, none (0) for
    dp. Measured on held-out tuning rows (benchmarks/eraser_budget_dev.py, Adult, seeds 0-2, 3 draws each): without
    a guard, eo patches from 100 and 300 queries were worse than no patch in 3 and 4 of 9 draws, with 0.9 in 0 and
    1; dp patches were never worse, and at 100 queries a 0.9 guard refused good ones (its estimate, from rows drawn
    stratified by label and weighted back, is the noisier)."""
    return 0.0 if criterion == "dp" else 0.9


def crossfit_verdict(y: np.ndarray, groups: np.ndarray, n_groups: int, criterion: str, base: np.ndarray,
                     decide_fold, *, confidence: float, seed: int, weights: np.ndarray | None = None,
                     strata: np.ndarray | None = None, folds: int = 5) -> dict[str, Any]:
    """Does a fitted rule beat no patch on rows it was not fitted on? The rows (those the method paid for) are cut
    into folds stratified by (group, label); `decide_fold(keep, held)` refits on the positions `keep` and returns
    the decisions of the positions `held`. The pooled out-of-fold decisions are compared with `base` (the model's
    own) by held_out_verdict, one-sided: `improved` when the change's upper `confidence` quantile is below 0."""
    from patcher.tuning import stratified_split

    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    after = np.zeros(len(y), np.int64)
    for held in stratified_split(y, groups, [1.0 / folds] * folds, [seed, 5]):
        keep = np.setdiff1d(np.arange(len(y)), held)
        after[held] = decide_fold(keep, held)
    v = held_out_verdict(y, base, after, groups, n_groups, criterion, seed=seed, weights=weights,
                         strata=groups * 2 + y if strata is None else strata, level=max(2 * confidence - 1, 0.0))
    return {**v, "folds": folds, "confidence": confidence}


def guard_words(v: dict[str, Any]) -> str:
    """The fit report's words when a method returns no patch because its guard could not show an improvement."""
    lo, hi = v["change_ci"]
    return (f"no patch returned: cross-fitted on the {v['rows']} scored rows, the patch moved {v['criterion']} from "
            f"{v['gap_before']:.3f} to {v['gap_after']:.3f} (change {v['change']:+.3f}, {v['ci_level']:.0%} CI "
            f"[{lo:+.3f}, {hi:+.3f}]), not enough to be {v['confidence']:.0%} sure it does better than the model "
            f"alone. The patch is the identity; a larger query budget may help (option guard=0.5 keeps a patch "
            f"that improved at all, guard=0 skips the check)")
