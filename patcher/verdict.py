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
