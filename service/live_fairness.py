"""Live fairness of served traffic: the counts one request adds, and the figures merged counts give.

Pure (no Redis, no HTTP): service.live_observe aggregates these counts in process and flushes them to
Redis; service.live_routes reads them back and calls `figures`.

A count is addressed by a field `patch|arm|source|group|name` (separator \\x1f). `arm` is how the
request was served: `active` (the active patch, or no patch), `shadow` (served raw, the patch run
beside it), `canary` (the canary's patched arm) or `control` (the canary's raw arm); `source` is
`given` (the request carried its group) or `estimated` (the patch's attribute estimator named it). Names,
per group:
- `n` rows; `raw_pos` rows the raw model decided positive; `out_pos` rows the patch decided positive
  (the raw decision where the patch did not run: control arms, unpatched versions);
- from feedback: `lab_n` labelled rows, `lab_pos` of them with label 1, and `raw_tp`, `raw_fp`,
  `out_tp`, `out_fp` (decided positive with label 1 / label 0).

The positive decision is class 1 (the argmax of the scores; for one output column, a probability above
0.5 or a logit above 0).
"""

from __future__ import annotations

from collections import defaultdict
from math import isfinite, sqrt
from statistics import NormalDist
from typing import Any

import numpy as np
from pydantic import BaseModel

from patcher.scores import to_log_probs

SEP = "\x1f"
ARMS = ("active", "shadow", "canary", "control")
COUNTS = ("n", "raw_pos", "out_pos", "lab_n", "lab_pos", "raw_tp", "raw_fp", "out_tp", "out_fp")


def decisions(scores: np.ndarray, kind: str) -> np.ndarray:
    """Each row's 0/1 decision (class 1 is the positive one) from scores in the model's own kind and shape."""
    s = np.asarray(scores)
    if s.ndim == 2 and s.shape[1] == 2:  # the binary case: argmax == 1 (ties go to class 0, as argmax's)
        return (s[:, 1] > s[:, 0]).astype(np.int8)
    if s.ndim == 2 and s.shape[1] > 2:
        return (s.argmax(axis=1) == 1).astype(np.int8)  # softmax/log keep the argmax: no conversion needed
    logp = to_log_probs(s.reshape(len(s), -1), kind)  # type: ignore[arg-type]
    return (logp[:, 1] > logp[:, 0]).astype(np.int8)


def field(patch: str, arm: str, source: str, group: str, name: str) -> str:
    return f"{patch}{SEP}{arm}{SEP}{source}{SEP}{group}{SEP}{name}"


def label_counts(patch: str, arm: str, source: str, groups: list[str], raw: list[int], out: list[int],
                 labels: list[int]) -> dict[str, int]:
    """The counts feedback adds: labels joined to the decisions recorded for their request."""
    counts: dict[str, int] = defaultdict(int)
    for g, r, o, y in zip(groups, raw, out, labels, strict=True):
        names = ["lab_n", *(["lab_pos"] if y else []),
                 *(f"{prefix}_{'tp' if y else 'fp'}" for prefix, d in (("raw", r), ("out", o)) if d)]
        for name in names:
            counts[field(patch, arm, source, g, name)] += 1
    return counts


# --- figures -------------------------------------------------------------------------------------------

_Z95 = NormalDist().inv_cdf(0.975)


def wilson(k: float, n: float, z: float = _Z95) -> tuple[float, float]:
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_ci(k1: float, n1: float, k2: float, n2: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval (95%) of p1 - p2: Wilson intervals combined; honest at small counts
    and near 0 or 1, where the normal interval is not."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    lo = d - sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def _num(x: float) -> float | None:
    return round(x, 6) if isfinite(x) else None


class OutputFigures(BaseModel):
    """One output (raw, served or patched) of one arm: by group and the gaps between groups."""

    selection_rate: dict[str, float | None]
    dp_gap: float | None  # highest minus lowest group selection rate
    dp_gap_ci: list[float | None]  # 95%, Newcombe's interval of those two groups' difference
    tpr: dict[str, float | None]
    fpr: dict[str, float | None]
    eo_gap: float | None  # max(TPR gap, FPR gap) over the labelled rows
    accuracy: float | None


class ArmFigures(BaseModel):
    patch: str | None
    arm: str
    group_source: str
    rows: int
    labelled: int
    rows_by_group: dict[str, int]
    labelled_by_group: dict[str, int]
    outputs: dict[str, OutputFigures]  # raw and served; a shadow arm adds `patched`
    drifting: bool = False


def _gap(rates: dict[str, float | None]) -> float | None:
    vals = [v for v in rates.values() if v is not None]
    return _num(max(vals) - min(vals)) if len(vals) >= 2 else None


def _output(cells: dict[str, dict[str, int]], prefix: str) -> OutputFigures:
    sr: dict[str, float | None] = {}
    tpr: dict[str, float | None] = {}
    fpr: dict[str, float | None] = {}
    tp_all = fp_all = lab_all = neg_all = 0
    for g, c in sorted(cells.items()):
        n, pos, lab, lab_pos = c["n"], c[f"{prefix}_pos"], c["lab_n"], c["lab_pos"]
        tp, fp = c[f"{prefix}_tp"], c[f"{prefix}_fp"]
        sr[g] = _num(pos / n) if n else None
        tpr[g] = _num(tp / lab_pos) if lab_pos else None
        fpr[g] = _num(fp / (lab - lab_pos)) if lab - lab_pos > 0 else None
        tp_all, fp_all, lab_all, neg_all = tp_all + tp, fp_all + fp, lab_all + lab, neg_all + lab - lab_pos
    ci: list[float | None] = [None, None]
    present = [(g, c) for g, c in cells.items() if c["n"] > 0]
    if len(present) >= 2:
        hi_g = max(present, key=lambda gc: gc[1][f"{prefix}_pos"] / gc[1]["n"])[1]
        lo_g = min(present, key=lambda gc: gc[1][f"{prefix}_pos"] / gc[1]["n"])[1]
        lo, hi = difference_ci(hi_g[f"{prefix}_pos"], hi_g["n"], lo_g[f"{prefix}_pos"], lo_g["n"])
        ci = [_num(lo), _num(hi)]
    t_gap, f_gap = _gap(tpr), _gap(fpr)
    eo = None if t_gap is None and f_gap is None else max(x for x in (t_gap, f_gap) if x is not None)
    accuracy = _num((tp_all + neg_all - fp_all) / lab_all) if lab_all else None
    return OutputFigures(selection_rate=sr, dp_gap=_gap(sr), dp_gap_ci=ci, tpr=tpr, fpr=fpr, eo_gap=eo,
                         accuracy=accuracy)


def figures(merged: dict[str, int], alert_gap: float) -> list[ArmFigures]:
    """Every arm's figures from merged counts (`field` -> count). An arm is drifting when the dp gap of what
    it served is above `alert_gap` with 95% confidence (its interval's lower end is above it)."""
    arms: dict[tuple[str, str, str], dict[str, dict[str, int]]] = {}
    for key, value in merged.items():
        parts = key.split(SEP)
        if len(parts) != 5 or parts[4] not in COUNTS:
            continue
        patch, arm, source, group, name = parts
        cell = arms.setdefault((patch, arm, source), {}).setdefault(group, dict.fromkeys(COUNTS, 0))
        cell[name] += int(value)
    out = []
    for (patch, arm, source), cells in sorted(arms.items(), key=lambda kv: (ARMS.index(kv[0][1])
                                                                             if kv[0][1] in ARMS else 9, kv[0])):
        raw = _output(cells, "raw")
        patched = _output(cells, "out")
        outputs = {"raw": raw, "served": raw, "patched": patched} if arm == "shadow" else \
            {"raw": raw, "served": patched}
        served_ci = outputs["served"].dp_gap_ci[0]
        out.append(ArmFigures(
            patch=None if patch == "none" else patch, arm=arm, group_source=source,
            rows=sum(c["n"] for c in cells.values()), labelled=sum(c["lab_n"] for c in cells.values()),
            rows_by_group={g: c["n"] for g, c in sorted(cells.items())},
            labelled_by_group={g: c["lab_n"] for g, c in sorted(cells.items())},
            outputs=outputs, drifting=served_ci is not None and served_ci > alert_gap))
    return out


def merge(hashes: list[dict[Any, Any]]) -> dict[str, int]:
    """Sum Redis hashes (bytes or str keys and values) into one count per field."""
    total: dict[str, int] = defaultdict(int)
    for h in hashes:
        for k, v in h.items():
            total[k.decode() if isinstance(k, bytes) else k] += int(v)
    return total
