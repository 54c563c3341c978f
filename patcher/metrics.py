"""Group-fairness and utility metrics for binary classifiers.

One module used everywhere (jobs, reports, live monitoring, benchmarks, and the methods' own
selection: ``rate_gap``, ``criterion_gap``, ``sweep``), so it is pure numpy and cheap: every report
metric is derived from four sufficient statistics per group, computed with a single ``np.unique``
and four ``np.bincount`` calls. The same derivation runs on bootstrap replicates, so point
estimates and confidence intervals can never disagree on a definition.

Inputs (all 1-D, same length N > 0):

- ``y_true``: 0/1 labels (ints, floats equal to 0/1, or bools).
- ``y_pred``: hard 0/1 labels, or with ``soft=True`` scores in [0, 1] (probability of class 1).
  Soft rates replace the hard label by the score: SR = mean score, TPR = mean score on
  positives, accuracy = mean of ``y*s + (1-y)*(1-s)``. With 0/1 inputs both modes agree.
- ``groups``: any hashable labels (ints, strings, bools); groups are sorted like ``np.unique``.

Semantics matched and where we depart, on purpose:

- Differences and ratios between groups follow Fairlearn's ``MetricFrame``
  (``difference()`` = max - min, ``ratio()`` = min / max, NaN groups skipped as pandas'
  ``max``/``min`` do; 0 / 0 = NaN). ``equalized_odds_*`` = worst of the TPR and FPR terms.
- Signed metrics (SPD, DIR, AOD, EOD) follow AIF360: unprivileged minus (or over) privileged,
  where "unprivileged" is every row not in the privileged set (AIF360's
  ``difference``/``ratio`` use ``~(groups == priv_group)``; a set of privileged groups is pooled,
  as with ``privileged_groups=[{...}, {...}]`` in its dataset API).
- Undefined rates: Fairlearn and AIF360 both return 0.0 for a rate whose denominator is empty
  (e.g. TPR of a group without positives; sklearn's ``confusion_matrix(normalize="true")`` and
  ``zero_division``). That silently turns "no data" into "never selected" and makes a patch look
  maximally unfair for a tiny group, so by default we return NaN and the between-group
  aggregations skip it (exactly what Fairlearn's aggregation does with NaN). Pass
  ``zero_division=0.0`` to reproduce Fairlearn/AIF360 numbers exactly in that corner.
  Worst-group accuracy and balanced accuracy always skip empty cells / absent classes
  (sklearn's ``balanced_accuracy_score`` averages over the classes present).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = [
    "RATE_NAMES",
    "CRITERION_RATES",
    "HEADLINE",
    "FairnessReport",
    "Sweep",
    "accuracy",
    "average_odds_difference",
    "balanced_accuracy",
    "criterion_gap",
    "decision_rates",
    "demographic_parity_difference",
    "demographic_parity_ed",
    "demographic_parity_ratio",
    "disparate_impact_ratio",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "equalized_odds_ed",
    "equalized_odds_ratio",
    "fairness_report",
    "group_rates",
    "gap_intervals",
    "group_table",
    "wilson_interval",
    "headline",
    "max_false_negative_rate",
    "signed_equal_opportunity_difference",
    "rate_gap",
    "statistical_parity_difference",
    "sweep",
    "true_positive_rate_difference",
    "worst_group_accuracy",
]

NAN = float("nan")

# Per-group metrics in a report's ``overall`` / ``by_group`` (``count`` is not a rate and is left
# out of ``difference`` / ``ratio``).
RATE_NAMES: tuple[str, ...] = (
    "selection_rate",
    "base_rate",
    "tpr",
    "fpr",
    "fnr",
    "tnr",
    "accuracy",
    "balanced_accuracy",
)

# Columns of the per-group sufficient statistics: everything else is derived from these.
_N, _NPOS, _SSUM, _TP = range(4)

# Bootstrap memory bound: rows gathered per chunk (~16 MB per gathered float64 array).
_BOOT_CHUNK_ELEMS = 1 << 21


# --------------------------------------------------------------------------- input handling
@dataclass(frozen=True)
class _Data:
    y: npt.NDArray[np.float64]  # 0/1 labels as float, ready for bincount weights
    p: npt.NDArray[np.float64]  # hard 0/1 predictions or scores in [0, 1]
    inv: npt.NDArray[np.intp]  # group index of each row
    labels: list[Hashable]  # sorted group labels (python scalars)


def _found(a: np.ndarray, limit: int = 10) -> str:
    """A short listing of the distinct values of ``a`` for error messages."""
    try:
        vals = np.unique(a)
    except TypeError:  # mixed types cannot be sorted
        vals = np.array(list(dict.fromkeys(a.tolist())), dtype=object)
    more = f" ... ({len(vals)} distinct)" if len(vals) > limit else ""
    return f"{vals[:limit].tolist()}{more}"


def _as_binary(a: npt.ArrayLike, name: str, hint: str = "") -> npt.NDArray[np.float64]:
    arr = np.asarray(a)
    if arr.dtype == object:  # e.g. pandas object / nullable-int columns holding numbers
        with contextlib.suppress(TypeError, ValueError):
            arr = arr.astype(np.float64)
    if arr.dtype.kind in "biuf":
        out = arr.astype(np.float64, copy=False)
        if np.all((out == 0) | (out == 1)):
            return out
    raise ValueError(f"{name} must be binary 0/1; found values {_found(arr)}{hint}")


def _as_scores(a: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric scores in [0, 1]; got dtype {arr.dtype}")
    out = arr.astype(np.float64, copy=False)
    if not np.all((out >= 0) & (out <= 1)):  # also rejects NaN
        bad = out[~((out >= 0) & (out <= 1))]
        raise ValueError(f"{name} scores must lie in [0, 1] (and not be NaN); found {bad[:5].tolist()}")
    return out


def _encode_groups(groups: npt.ArrayLike) -> tuple[npt.NDArray[np.intp], list[Hashable]]:
    g = np.asarray(groups)
    if g.dtype != object:
        uniq, inv = np.unique(g, return_inverse=True)
        return inv.reshape(-1).astype(np.intp, copy=False), uniq.tolist()
    # Object arrays (strings from pandas): a dict pass is ~5x faster than np.unique's object sort.
    values = g.tolist()
    labels: list[Hashable] = list(dict.fromkeys(values))
    with contextlib.suppress(TypeError):  # unsortable mix (e.g. None and str): first-seen order
        labels = sorted(labels)  # type: ignore[type-var]
    code = {lab: i for i, lab in enumerate(labels)}
    return np.fromiter(map(code.__getitem__, values), np.intp, len(values)), labels


def _prepare(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, groups: npt.ArrayLike, soft: bool) -> _Data:
    arrays = {"y_true": np.asarray(y_true), "y_pred": np.asarray(y_pred), "groups": np.asarray(groups)}
    for name, arr in arrays.items():
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"y_true, y_pred and groups must have the same length; got {lengths}")
    if lengths["y_true"] == 0:
        raise ValueError("empty input: y_true, y_pred and groups have no rows")
    y = _as_binary(arrays["y_true"], "y_true")
    if soft:
        p = _as_scores(arrays["y_pred"], "y_pred")
    else:
        p = _as_binary(arrays["y_pred"], "y_pred", hint="; pass soft=True for scores/probabilities")
    inv, labels = _encode_groups(arrays["groups"])
    return _Data(y=y, p=p, inv=inv, labels=labels)


def _group_stats(d: _Data) -> npt.NDArray[np.float64]:
    """(G, 4) sufficient statistics per group: n, n_pos, sum(pred), sum(pred on positives)."""
    k = len(d.labels)
    return np.stack(
        [
            np.bincount(d.inv, minlength=k).astype(np.float64),
            np.bincount(d.inv, weights=d.y, minlength=k),
            np.bincount(d.inv, weights=d.p, minlength=k),
            np.bincount(d.inv, weights=d.y * d.p, minlength=k),
        ],
        axis=-1,
    )


def _privileged_mask(labels: list[Hashable], privileged: Any) -> npt.NDArray[np.bool_]:
    """Boolean mask over groups; ``privileged`` is one label or a collection of labels."""
    if isinstance(privileged, np.ndarray):
        wanted = privileged.reshape(-1).tolist()
    elif isinstance(privileged, Iterable) and not isinstance(privileged, (str, bytes)):
        # A collection of labels, unless the iterable is itself a label (e.g. a tuple).
        wanted = [privileged] if privileged in labels else list(privileged)
    else:
        wanted = [privileged]
    missing = [w for w in wanted if w not in labels]
    if missing or not wanted:
        raise ValueError(f"privileged group(s) {missing or wanted} not found among groups {labels}")
    mask = np.array([lab in wanted for lab in labels], dtype=bool)
    if mask.all():
        raise ValueError(f"every group {labels} is privileged: no unprivileged rows to compare")
    return mask


# --------------------------------------------------------------------------- core arithmetic
# Everything below works on stats of shape (..., G, 4) so one code path serves the point estimate
# (leading shape ()) and all bootstrap replicates at once (leading shape (B,)).


def _div(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    return np.divide(num, den, out=np.full(num.shape, fill), where=den > 0)


def _rates(s: np.ndarray, zero_division: float) -> dict[str, np.ndarray]:
    n, npos, ssum, tp = s[..., _N], s[..., _NPOS], s[..., _SSUM], s[..., _TP]
    nneg, fp = n - npos, ssum - tp
    # Balanced accuracy averages the classes present (sklearn), whatever zero_division says.
    tpr_nan, tnr_nan = _div(tp, npos, NAN), _div(nneg - fp, nneg, NAN)
    present = (npos > 0).astype(np.float64) + (nneg > 0)
    return {
        "count": n,
        "selection_rate": _div(ssum, n, NAN),
        "base_rate": _div(npos, n, NAN),
        "tpr": _div(tp, npos, zero_division),
        "fpr": _div(fp, nneg, zero_division),
        "fnr": _div(npos - tp, npos, zero_division),
        "tnr": _div(nneg - fp, nneg, zero_division),
        "accuracy": _div(tp + nneg - fp, n, NAN),
        "balanced_accuracy": _div(np.nan_to_num(tpr_nan) + np.nan_to_num(tnr_nan), present, NAN),
    }


def rate_gap(rates: npt.ArrayLike, *, signed: bool = False) -> np.ndarray:
    """The fairness gap of per-group rates (last axis, any number of groups): max - min over the groups
    whose rate is defined (NaN skipped, as pandas' max/min do; NaN when none is). Every criterion gap in
    the package is this one. ``signed`` with two groups: rate[0] - rate[1] (AIF360's unprivileged minus
    privileged when group 0 is the unprivileged one); with more groups there is no sign, max - min."""
    x = np.asarray(rates, np.float64)
    if signed and x.shape[-1] == 2:
        return x[..., 0] - x[..., 1]
    # fmax/fmin skip NaN and stay NaN, without warnings, if all are NaN.
    return np.fmax.reduce(x, axis=-1) - np.fmin.reduce(x, axis=-1)


def _ratio(x: np.ndarray) -> np.ndarray:
    return _div(np.fmin.reduce(x, axis=-1), np.fmax.reduce(x, axis=-1), NAN)


def _nanmean(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    return _div(np.where(ok, x, 0.0).sum(axis=-1), ok.sum(axis=-1), NAN)


def _ed(group: np.ndarray, overall: np.ndarray) -> np.ndarray:
    # Fairness Reprogramming: ED_M = (1/|G|) sum_g |M_g - M_all|; undefined groups are skipped.
    return _nanmean(np.abs(group - overall[..., None]))


def _summary(
    s: np.ndarray, priv: npt.NDArray[np.bool_] | None, zero_division: float
) -> dict[str, np.ndarray]:
    """Headline metrics from stats (..., G, 4)."""
    g = _rates(s, zero_division)
    o = _rates(s.sum(axis=-2), zero_division)
    # Worst-group accuracy: min over (group, label) cells with rows = min over TPR_g and TNR_g.
    strict = _rates(s, NAN)
    cells = np.concatenate([strict["tpr"], strict["tnr"]], axis=-1)
    out = {
        "accuracy": o["accuracy"],
        "balanced_accuracy": o["balanced_accuracy"],
        "worst_group_accuracy": np.fmin.reduce(cells, axis=-1),
        "dp_diff": rate_gap(g["selection_rate"]),
        "dp_ratio": _ratio(g["selection_rate"]),
        "eo_diff": np.fmax(rate_gap(g["tpr"]), rate_gap(g["fpr"])),
        "eo_ratio": np.fmin(_ratio(g["tpr"]), _ratio(g["fpr"])),
        "eopp_diff": rate_gap(g["tpr"]),
        "tprd": rate_gap(g["tpr"]),
        "max_fnr": np.fmax.reduce(g["fnr"], axis=-1),
        "dp_ed": _ed(g["selection_rate"], o["selection_rate"]),
        "eo_ed": 0.5 * (_ed(g["fpr"], o["fpr"]) + _ed(g["fnr"], o["fnr"])),
    }
    if priv is not None:
        p = _rates(s[..., priv, :].sum(axis=-2), zero_division)
        u = _rates(s[..., ~priv, :].sum(axis=-2), zero_division)
        out["spd"] = u["selection_rate"] - p["selection_rate"]
        out["dir"] = _div(u["selection_rate"], p["selection_rate"], zero_division)
        out["aod"] = 0.5 * ((u["fpr"] - p["fpr"]) + (u["tpr"] - p["tpr"]))
        out["eod"] = u["tpr"] - p["tpr"]
    return out


def _metric(
    key: str,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    soft: bool,
    zero_division: float,
    privileged: Any = None,
) -> float:
    d = _prepare(y_true, y_pred, groups, soft)
    priv = None if privileged is None else _privileged_mask(d.labels, privileged)
    return float(_summary(_group_stats(d), priv, zero_division)[key])


# --------------------------------------------------------------------------- public metrics
def group_rates(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> dict[Hashable, dict[str, float]]:
    """Per-group ``count`` and the rates in ``RATE_NAMES``, keyed by group label (sorted)."""
    d = _prepare(y_true, y_pred, groups, soft)
    rates = _rates(_group_stats(d), zero_division)
    return {lab: {k: float(v[i]) for k, v in rates.items()} for i, lab in enumerate(d.labels)}


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, *, soft: bool = False) -> float:
    """Overall (soft) accuracy."""
    return _metric("accuracy", y_true, y_pred, np.zeros(np.shape(y_true)[:1]), soft, NAN)


def balanced_accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, *, soft: bool = False) -> float:
    """½(TPR + TNR) overall; a class absent from ``y_true`` is left out (sklearn)."""
    return _metric("balanced_accuracy", y_true, y_pred, np.zeros(np.shape(y_true)[:1]), soft, NAN)


def worst_group_accuracy(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, groups: npt.ArrayLike, *, soft: bool = False
) -> float:
    """Min accuracy over the (group, label) cells that have rows."""
    return _metric("worst_group_accuracy", y_true, y_pred, groups, soft, NAN)


def demographic_parity_difference(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, groups: npt.ArrayLike, *, soft: bool = False
) -> float:
    """max_g SR_g - min_g SR_g (Fairlearn). ``y_true`` is validated but unused."""
    return _metric("dp_diff", y_true, y_pred, groups, soft, NAN)


def demographic_parity_ratio(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, groups: npt.ArrayLike, *, soft: bool = False
) -> float:
    """min_g SR_g / max_g SR_g (Fairlearn); NaN when every group has SR 0."""
    return _metric("dp_ratio", y_true, y_pred, groups, soft, NAN)


def equalized_odds_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """max(TPR gap, FPR gap) over groups (Fairlearn, ``agg="worst_case"``)."""
    return _metric("eo_diff", y_true, y_pred, groups, soft, zero_division)


def equalized_odds_ratio(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """min(TPR ratio, FPR ratio), each min/max over groups (Fairlearn)."""
    return _metric("eo_ratio", y_true, y_pred, groups, soft, zero_division)


def equal_opportunity_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """TPR gap, max - min over groups (Fairlearn's ``equal_opportunity_difference``; unsigned)."""
    return _metric("eopp_diff", y_true, y_pred, groups, soft, zero_division)


def true_positive_rate_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """TPRD (FORML's table metric): the same TPR gap as ``equal_opportunity_difference``."""
    return _metric("tprd", y_true, y_pred, groups, soft, zero_division)


def max_false_negative_rate(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """maxFNR (FORML): max_g FNR_g over groups with positives."""
    return _metric("max_fnr", y_true, y_pred, groups, soft, zero_division)


def demographic_parity_ed(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, groups: npt.ArrayLike, *, soft: bool = False
) -> float:
    """Fairness Reprogramming's DP: (1/|G|) sum_g |SR_g - SR_all|."""
    return _metric("dp_ed", y_true, y_pred, groups, soft, NAN)


def equalized_odds_ed(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """Fairness Reprogramming's EO: ½(ED_FPR + ED_FNR)."""
    return _metric("eo_ed", y_true, y_pred, groups, soft, zero_division)


def statistical_parity_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    privileged: Any,
    *,
    soft: bool = False,
) -> float:
    """AIF360 SPD = SR_unpriv - SR_priv (unprivileged = all rows outside ``privileged``)."""
    return _metric("spd", y_true, y_pred, groups, soft, NAN, privileged)


def disparate_impact_ratio(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    privileged: Any,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """AIF360 DIR = SR_unpriv / SR_priv; ``zero_division`` when SR_priv = 0 (AIF360 uses 0)."""
    return _metric("dir", y_true, y_pred, groups, soft, zero_division, privileged)


def average_odds_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    privileged: Any,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """AIF360 AOD = ½[(FPR_u - FPR_p) + (TPR_u - TPR_p)]."""
    return _metric("aod", y_true, y_pred, groups, soft, zero_division, privileged)


def signed_equal_opportunity_difference(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    privileged: Any,
    *,
    soft: bool = False,
    zero_division: float = NAN,
) -> float:
    """AIF360's ``equal_opportunity_difference`` (EOD) = TPR_u - TPR_p, signed."""
    return _metric("eod", y_true, y_pred, groups, soft, zero_division, privileged)


# --------------------------------------------------------------------------- headline metrics
HEADLINE = ("accuracy", "balanced_accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")


def headline(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, privileged: Any = None) -> dict[str, float]:
    """The metrics every bench, job and peer comparison reports (AIF360's signed ones with ``privileged``)."""
    summary = fairness_report(y, pred, groups, privileged=privileged).summary
    keys = (*HEADLINE, "tprd", "max_fnr", "eopp_diff") + (("spd", "aod", "eod") if privileged is not None else ())
    return {k: float(summary[k]) for k in keys if summary.get(k) is not None}


# --------------------------------------------------------------------------- what methods select on
# Methods rank thousands of candidate decisions on their tuning rows: the same gaps as above, from per-group
# means over integer group ids 0..G-1, and every cut of a score at once.


def decision_rates(decision: npt.ArrayLike, y: np.ndarray, groups: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """Per-group selection rate ("sr"), TPR and FPR of hard 0/1 or soft [0, 1] decisions (a soft decision
    counts as its probability), each [G], NaN where a group has no such rows."""
    d = np.asarray(decision, np.float64)
    out = {k: np.zeros(n_groups) for k in ("sr", "tpr", "fpr")}
    for g in range(n_groups):
        m = groups == g
        pos, neg = m & (y == 1), m & (y == 0)
        out["sr"][g] = d[m].mean() if m.any() else np.nan
        out["tpr"][g] = d[pos].mean() if pos.any() else np.nan
        out["fpr"][g] = d[neg].mean() if neg.any() else np.nan
    return out


CRITERION_RATES: dict[str, tuple[str, ...]] = {"dp": ("sr",), "eopp": ("tpr",), "eo": ("tpr", "fpr")}


def criterion_gap(decision: npt.ArrayLike, y: np.ndarray, groups: np.ndarray, n_groups: int, criterion: str) -> float:
    """The criterion's gap (Fairlearn's definitions) of hard or soft decisions: dp = selection-rate gap,
    eopp = TPR gap, eo = max(TPR gap, FPR gap); 0 when no two groups have the rate."""
    r = decision_rates(decision, y, groups, n_groups)
    return max(float(np.nan_to_num(rate_gap(r[k]))) for k in CRITERION_RATES[criterion])


@dataclass(frozen=True)
class Sweep:
    """Decisions ``score > cut`` at many cuts at once: weighted counts of the rows decided positive per
    group and label, ``positive`` [..., K, G, 2] (label 0, label 1), and the totals ``total`` [..., G, 2]."""

    cuts: np.ndarray  # [K]
    positive: np.ndarray
    total: np.ndarray
    weight: np.ndarray  # [...] the summed row weights
    ordered: np.ndarray | None = None  # every-cut sweeps: the scores, descending (cut k = top k rows positive)

    def rates(self) -> dict[str, np.ndarray]:
        """Per cut and group: "sr", "tpr", "fpr", "tnr" [..., K, G]; NaN where a group has no such rows."""
        pos, tot = self.positive, self.total[..., None, :, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"sr": pos.sum(-1) / tot.sum(-1), "tpr": pos[..., 1] / tot[..., 1],
                    "fpr": pos[..., 0] / tot[..., 0], "tnr": (tot[..., 0] - pos[..., 0]) / tot[..., 0]}

    def accuracy(self) -> np.ndarray:
        tp, fp = self.positive[..., 1].sum(-1), self.positive[..., 0].sum(-1)
        return (tp + (self.total[..., 0].sum(-1)[..., None] - fp)) / self.weight[..., None]

    def gap(self, criterion: str) -> np.ndarray:
        """The criterion's gap at every cut (0 where no two groups have the rate), [..., K]."""
        r = self.rates()
        return np.max([np.nan_to_num(rate_gap(r[k])) for k in CRITERION_RATES[criterion]], axis=0)


def sweep(score: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, *, cuts: np.ndarray | None = None,
          weights: np.ndarray | None = None) -> Sweep:
    """The threshold sweep. Without ``cuts``: every cut, "top k rows positive" for k = 0..n (rows sorted by
    descending score, stable), one sort and cumulative counts; ``weights`` ([n] or resamples [B, n]) make
    the counts weighted; the cuts are midpoints between neighbouring scores (ties give unrealisable cuts:
    see ``ordered``). With ``cuts``: the decisions ``score > cut`` at each given cut (unweighted)."""
    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    if cuts is not None:
        positive = np.zeros((len(cuts), n_groups, 2))
        total = np.zeros((n_groups, 2))
        for g in range(n_groups):
            for label in (0, 1):
                s = np.sort(score[(groups == g) & (y == label)])
                positive[:, g, label] = len(s) - np.searchsorted(s, cuts, side="right")
                total[g, label] = len(s)
        return Sweep(np.asarray(cuts), positive, total, np.asarray(float(len(y))))
    order = np.argsort(-score, kind="stable")
    s, yy, gg = score[order], y[order], groups[order]
    n = len(s)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)[..., order]
    cells = np.zeros((*w.shape[:-1], n + 1, n_groups * 2))
    cells[..., np.arange(1, n + 1), gg * 2 + yy] = w
    positive = np.cumsum(cells, axis=-2).reshape(*w.shape[:-1], n + 1, n_groups, 2)
    edges = np.concatenate([[s[0] + 1.0], (s[:-1] + s[1:]) / 2, [s[-1] - 1.0]]) if n else np.zeros(1)
    return Sweep(edges, positive, positive[..., -1, :, :], w.sum(-1), s)


# --------------------------------------------------------------------------- report
def _json_float(v: Any) -> float | None:
    # JSON has no NaN/inf: undefined metrics travel as null.
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


JsonFloat = Annotated[float | None, BeforeValidator(_json_float)]


class FairnessReport(BaseModel):
    """A MetricFrame-shaped report. Group labels become strings (JSON object keys)."""

    model_config = ConfigDict(frozen=True)

    n: int
    soft: bool
    groups: list[str]
    privileged: list[str] | None = None
    zero_division: JsonFloat = None
    overall: dict[str, JsonFloat]
    by_group: dict[str, dict[str, JsonFloat]]
    difference: dict[str, JsonFloat]  # max - min over groups, NaN groups skipped
    ratio: dict[str, JsonFloat]  # min / max over groups
    summary: dict[str, JsonFloat]
    ci: dict[str, tuple[JsonFloat, JsonFloat]] = {}  # percentile bootstrap CI per summary metric
    n_boot: int = 0
    ci_level: float = 0.95
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _bootstrap_stats(d: _Data, soft: bool, n_boot: int, seed: int) -> np.ndarray:
    """(B, G, 4) stats of ``n_boot`` resamples, stratified by group (each group keeps its size)."""
    rng = np.random.default_rng(seed)
    k = len(d.labels)
    out = np.empty((n_boot, k, 4))
    order = np.argsort(d.inv, kind="stable")
    bounds = np.cumsum(np.bincount(d.inv, minlength=k))[:-1]
    for gi, rows in enumerate(np.split(order, bounds)):
        n = len(rows)
        out[:, gi, _N] = n
        y, p = d.y[rows], d.p[rows]
        if not soft:
            # Hard labels: a group is summarised by its 4 (y, y_hat) cell counts, and resampling
            # n rows with replacement is exactly Multinomial(n, cell shares): O(B) not O(B*N).
            cells = np.bincount((2 * y + p).astype(np.intp), minlength=4).astype(np.float64)
            c = rng.multinomial(n, cells / n, size=n_boot)  # columns: (0,0) (0,1) (1,0) (1,1)
            out[:, gi, _NPOS] = c[:, 2] + c[:, 3]
            out[:, gi, _SSUM] = c[:, 1] + c[:, 3]
            out[:, gi, _TP] = c[:, 3]
            continue
        yp = y * p
        step = max(1, _BOOT_CHUNK_ELEMS // n)
        for b0 in range(0, n_boot, step):
            idx = rng.integers(0, n, size=(min(step, n_boot - b0), n))
            out[b0 : b0 + len(idx), gi, _NPOS] = y[idx].sum(axis=1)
            out[b0 : b0 + len(idx), gi, _SSUM] = p[idx].sum(axis=1)
            out[b0 : b0 + len(idx), gi, _TP] = yp[idx].sum(axis=1)
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    ok = samples[~np.isnan(samples)]
    if ok.size == 0:
        return NAN, NAN
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def fairness_report(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    soft: bool = False,
    privileged: Any = None,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    zero_division: float = NAN,
) -> FairnessReport:
    """All metrics at once, shaped like Fairlearn's MetricFrame, with optional bootstrap CIs.

    ``privileged``: one group label or a collection of labels; adds AIF360's spd/dir/aod/eod.
    ``n_boot > 0``: percentile CIs for every ``summary`` metric from a bootstrap that resamples
    rows within each group (group sizes fixed, as they are fixed by design in an audit);
    deterministic given ``seed``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1); got {ci}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0; got {n_boot}")
    d = _prepare(y_true, y_pred, groups, soft)
    priv = None if privileged is None else _privileged_mask(d.labels, privileged)
    keys = [str(lab) for lab in d.labels]
    if len(set(keys)) != len(keys):
        raise ValueError(f"group labels {d.labels} are not distinct as strings")

    s = _group_stats(d)
    g = _rates(s, zero_division)
    o = _rates(s.sum(axis=0), zero_division)
    summary = _summary(s, priv, zero_division)
    intervals: dict[str, tuple[float, float]] = {}
    if n_boot > 0:
        boot = _summary(_bootstrap_stats(d, soft, n_boot, seed), priv, zero_division)
        intervals = {k: _percentile_ci(v, ci) for k, v in boot.items()}

    return FairnessReport(
        n=len(d.y),
        soft=soft,
        groups=keys,
        privileged=None if priv is None else [k for k, m in zip(keys, priv, strict=True) if m],
        zero_division=zero_division,
        overall={k: float(v) for k, v in o.items()},
        by_group={key: {k: float(v[i]) for k, v in g.items()} for i, key in enumerate(keys)},
        difference={k: float(rate_gap(g[k])) for k in RATE_NAMES},
        ratio={k: float(_ratio(g[k])) for k in RATE_NAMES},
        summary={k: float(v) for k, v in summary.items()},
        ci=intervals,
        n_boot=n_boot,
        ci_level=ci,
        seed=seed,
    )


# --------------------------------------------------------------------------- per-group table with intervals
def wilson_interval(successes: npt.ArrayLike, n: npt.ArrayLike, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (elementwise); NaN where n = 0. Unlike the normal
    interval it stays inside [0, 1] and is honest for the small groups of a many-valued attribute."""
    from statistics import NormalDist

    k, m = np.asarray(successes, np.float64), np.asarray(n, np.float64)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / m
        centre = (p + z * z / (2 * m)) / (1 + z * z / m)
        half = z / (1 + z * z / m) * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
    lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return np.where(m > 0, lo, NAN), np.where(m > 0, hi, NAN)


def _rounded(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(float(x)) else None


def group_table(y: np.ndarray, decisions: dict[str, np.ndarray], groups: np.ndarray, names: Sequence[str],
                level: float = 0.95) -> list[dict[str, Any]]:
    """One row per group (ids 0..G-1 named by `names`): its size and base rate, and for each hard 0/1 decision
    in `decisions` (e.g. {"before": ..., "after": ...}) its selection rate, TPR and FPR with Wilson intervals
    (`selection_rate_before`, `selection_rate_before_ci`, ...). Undefined rates are null."""
    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    rows = []
    for g, name in enumerate(names):
        m = groups == g
        pos, neg = m & (y == 1), m & (y == 0)
        row: dict[str, Any] = {"name": str(name), "n": int(m.sum()), "n_pos": int(pos.sum()),
                               "base_rate": _rounded(y[m].mean()) if m.any() else None}
        for key, d in decisions.items():
            d = np.asarray(d)
            for rate, mask in (("selection_rate", m), ("tpr", pos), ("fpr", neg)):
                k, n = float(d[mask].sum()), float(mask.sum())
                lo, hi = wilson_interval(k, n, level)
                row[f"{rate}_{key}"] = _rounded(k / n) if n else None
                row[f"{rate}_{key}_ci"] = [_rounded(lo), _rounded(hi)] if n else None
        rows.append(row)
    return rows


def gap_intervals(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """Gaps and ratios over all groups with percentile-bootstrap intervals (rows resampled within each group):
    dp_diff, dp_ratio, eo_diff, eo_ratio, each {"value", "ci"}."""
    rep = fairness_report(y, pred, groups, n_boot=n_boot, seed=seed, ci=level)
    return {k: {"value": _rounded(rep.summary[k]) if rep.summary[k] is not None else None,
                "ci": [None if v is None else _rounded(v) for v in rep.ci[k]]}
            for k in ("dp_diff", "dp_ratio", "eo_diff", "eo_ratio")}
