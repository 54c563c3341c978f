"""Per-group figures of decisions before and after a patch, with bootstrap intervals, for job results and reports.

A group's selection rate, accuracy, TPR and FPR are functions of its four (label, decision) cell counts, so a
bootstrap resample of the group's rows is one multinomial draw of those counts: `resamples` draws cost the same
whatever the number of rows (no [resamples, rows] index matrix). Groups are resampled separately (stratified),
as they are reported separately. Labels and decisions other than 0/1 (several classes) give accuracy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIGURES = ("selection_rate", "accuracy", "tpr", "fpr")


def _figures(c: np.ndarray) -> dict[str, np.ndarray]:
    """Figures from cell counts [..., 4] = (y0 d0, y0 d1, y1 d0, y1 d1); NaN where undefined."""
    c = c.astype(np.float64)
    n = c.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"selection_rate": (c[..., 1] + c[..., 3]) / n, "accuracy": (c[..., 0] + c[..., 3]) / n,
                "tpr": c[..., 3] / (c[..., 2] + c[..., 3]), "fpr": c[..., 1] / (c[..., 0] + c[..., 1])}


def _interval(point: float, draws: np.ndarray, level: float) -> list[float | None]:
    """[value, low, high] (percentile interval); None for an undefined figure (JSON has no NaN)."""
    if not np.isfinite(point):
        return [None, None, None]
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return [float(point), None, None]
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return [float(point), float(lo), float(hi)]


def by_group(y: np.ndarray, before: np.ndarray, after: np.ndarray, groups: np.ndarray, names: list[str],
             *, seed: int = 0, resamples: int = 1000, level: float = 0.95) -> dict[str, Any]:
    """{"groups": [{"group", "n", "before": {figure: [value, low, high]}, "after": {...}}], "resamples", "level"}."""
    y, groups = np.asarray(y).astype(np.int64), np.asarray(groups)
    decisions = {"before": np.asarray(before).astype(np.int64), "after": np.asarray(after).astype(np.int64)}
    binary = bool(np.isin(y, (0, 1)).all() and all(np.isin(d, (0, 1)).all() for d in decisions.values()))
    rng = np.random.default_rng(seed)
    rows = []
    for g, name in enumerate(names):
        m = groups == g
        n = int(m.sum())
        row: dict[str, Any] = {"group": name, "n": n}
        for when, d in decisions.items():
            if binary:
                cells = np.bincount(y[m] * 2 + d[m], minlength=4)
            else:  # several classes: correct / wrong as the (y1 d1) / (y0 d1) cells, so only accuracy means anything
                right = int((y[m] == d[m]).sum())
                cells = np.array([0, n - right, 0, right])
            point = _figures(cells)
            draws = _figures(rng.multinomial(n, cells / n, size=resamples)) if n else {k: np.array([]) for k in point}
            figures = FIGURES if binary else ("accuracy",)
            row[when] = {k: _interval(float(point[k]), draws[k], level) for k in figures}
        rows.append(row)
    return {"groups": rows, "resamples": resamples, "level": level}
