"""Reject-option classification (Kamiran, Karim, Zhang, ICDM 2012; the rule AIF360 implements).

Around the decision boundary the model is least sure; inside the band (t - m, t + m] of p(1) the
disfavoured groups get the positive decision and the favoured groups the negative one, outside
it the decision is p(1) > t. The grid over t (0.01..0.99, 100 steps) and m (0..min(t, 1 - t),
50 steps) is searched on the tune rows; the pick is the best balanced accuracy among the points
whose bias is within `bound`, else the least biased point. Bias per criterion: dp = selection-rate
gap, eopp = TPR gap, eo = gap of (TPR + FPR) / 2 (AIF360's average odds difference); with two
groups these are |SPD|, |EOD| and |AOD|. More than two groups: a group is disfavoured when its
rate under the model is below the groups' mean (override with `favour`).

Deterministic: the patch moves each group's cut to t - m (disfavoured) or t + m (favoured).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from patcher.methods.contract import FitRequest, FitResult, Method
from patcher.methods.postprocess_common import (
    BENCH,
    BIG,
    Criterion,
    Scored,
    StepRule,
    check_criterion,
    guard_exclude,
    guard_field,
    guard_refused,
    guard_report,
    guard_rule,
    logit,
    score_tune,
    step_rule_graph,
)
from patcher.metrics import Sweep, criterion_gap, decision_rates, rate_gap, sweep
from patcher.oracle import Oracle
from patcher.patch import Patch
from patcher.tuning import TuningData

CRITERIA = ("dp", "eo", "eopp")


class RejectOptionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bound: float = Field(0.05, ge=0, le=1, description="largest bias accepted on the tune rows (AIF360: 0.05)")
    low: float = Field(0.01, gt=0, lt=1, description="lowest threshold on p(1) searched")
    high: float = Field(0.99, gt=0, lt=1, description="highest threshold on p(1) searched")
    n_thresholds: int = Field(100, ge=1, le=10_000, description="thresholds searched between low and high")
    n_margins: int = Field(50, ge=1, le=10_000, description="band half-widths searched per threshold")
    favour: list[str] | None = Field(None, description="groups given the positive decision in the band "
                                     "(default: groups whose rate under the model is below the mean)")
    guard: float | None = guard_field()


class RejectOptionReport(BaseModel):
    method: str = "reject_option"
    criterion: Criterion
    queries_used: int
    group_at_inference: bool = True
    threshold: float  # on p(1)
    margin: float
    favoured: list[str]  # groups that get the positive decision in the band
    satisfied: bool  # some grid point had bias within the bound on the tune rows
    tune_before: dict[str, float]
    tune_after: dict[str, float]
    guard: dict[str, Any] | None = None  # the cross-fitted comparison with no patch (option guard)
    warning: str | None = None
    fit_seconds: float


def _quantity(rates: dict[str, np.ndarray], criterion: str) -> np.ndarray:
    """The per-group quantity the band equalises, from decision or sweep rates."""
    return {"dp": rates["sr"], "eopp": rates["tpr"], "eo": 0.5 * (rates["tpr"] + rates["fpr"])}[criterion]


def grid_search(prob: np.ndarray, y: np.ndarray, groups: np.ndarray, G: int, favoured: np.ndarray,
                criterion: str, opts: RejectOptionOptions):
    """Bias and balanced accuracy at every (t, m) of the grid: a favoured group decides p > t - m, the others
    p > t + m (patcher.metrics.sweep at both cuts). Returns (t, m, bias, balanced_accuracy) arrays."""
    ts, ms = [], []
    for t in np.linspace(opts.low, opts.high, opts.n_thresholds):
        for m in np.linspace(0.0, t if t <= 0.5 else 1.0 - t, opts.n_margins):
            ts.append(t)
            ms.append(m)
    t, m = np.asarray(ts), np.asarray(ms)
    P, N = float((y == 1).sum()), float((y == 0).sum())
    low, high = sweep(prob, y, groups, G, cuts=t - m), sweep(prob, y, groups, G, cuts=t + m)
    band = Sweep(t, np.where(np.asarray(favoured, bool)[:, None], low.positive, high.positive), low.total, low.weight)
    tp, fp = band.positive[..., 1].sum(-1), band.positive[..., 0].sum(-1)
    bias = rate_gap(_quantity(band.rates(), criterion))
    bal_acc = 0.5 * (tp / P + (N - fp) / N)
    return t, m, bias, bal_acc


def band_rule(s: Scored, favoured: np.ndarray, criterion: str, opts: RejectOptionOptions):
    """The band chosen on scored rows `s`: (rule, threshold, margin, the grid point, bias and balanced accuracy
    over the grid, which points are within the bound)."""
    G = s.n_groups
    t, m, bias, bal_acc = grid_search(s.prob, s.y, s.groups, G, favoured, criterion, opts)
    ok = bias <= opts.bound + 1e-12
    j = int(np.argmax(np.where(ok, bal_acc, -np.inf))) if ok.any() else int(np.argmin(bias))
    threshold, margin = float(t[j]), float(m[j])
    low = float(logit(threshold - margin)) if threshold - margin > 0 else -BIG  # p > 0: everyone
    high = float(logit(threshold + margin)) if threshold + margin < 1 else BIG  # p > 1: nobody
    cuts = np.where(favoured, low, high)
    rule = StepRule(np.stack([cuts, np.full(G, BIG)], 1), np.tile([1.0, 0.0], (G, 1)), np.zeros(G))
    return rule, threshold, margin, j, bias, bal_acc, ok


def fit(access: Oracle, data: TuningData, request: FitRequest, opts: RejectOptionOptions) -> FitResult:
    """Search the reject-option band on the tune rows' scores; the patch needs the group at inference."""
    criterion = request.criterion
    check_criterion(criterion, CRITERIA, "reject_option")
    if opts.low >= opts.high:
        raise ValueError("low must be below high")
    started = time.perf_counter()
    s = score_tune(access, data, request)
    G, prob = s.n_groups, s.prob
    base = (prob > 0.5).astype(np.float64)
    if opts.favour is not None:
        unknown = set(opts.favour) - set(data.group_names)
        if unknown:
            raise ValueError(f"favour names unknown groups {sorted(unknown)}; groups: {list(data.group_names)}")
        favoured = np.array([n in opts.favour for n in data.group_names])
    else:
        q = _quantity(decision_rates(base, s.y, s.groups, G), criterion)
        favoured = q < q.mean()
    rule, threshold, margin, j, bias, bal_acc, ok = band_rule(s, favoured, criterion, opts)
    guard = guard_rule(s, criterion, opts.guard, lambda part: band_rule(part, favoured, criterion, opts)[0], request)
    if guard_refused(guard):  # no patch: every group keeps the model's own cut, p > 0.5
        threshold, margin = 0.5, 0.0
        rule = StepRule(np.stack([np.zeros(G), np.full(G, BIG)], 1), np.tile([1.0, 0.0], (G, 1)), np.zeros(G))
    after = rule.decide(s.margin, s.groups, None).astype(np.float64)
    chosen = {"balanced_accuracy": float(bal_acc[j]), "bias": float(bias[j])}
    if guard_refused(guard):
        rates = decision_rates(after, s.y, s.groups, G)
        tpr, tnr = after[s.y == 1].mean(), 1 - after[s.y == 0].mean()
        chosen = {"balanced_accuracy": float(0.5 * (tpr + tnr)), "bias": float(rate_gap(_quantity(rates, criterion)))}
    report = RejectOptionReport(
        criterion=criterion, queries_used=s.queries_used, threshold=threshold, margin=margin,
        favoured=[n for n, f in zip(data.group_names, favoured, strict=True) if f], satisfied=bool(ok.any()),
        tune_before={"accuracy": float(np.mean(base == s.y)),
                     criterion: criterion_gap(base, s.y, s.groups, G, criterion)},
        tune_after={"accuracy": float(np.mean(after == s.y)), **chosen,
                    criterion: criterion_gap(after, s.y, s.groups, G, criterion)},
        **guard_report(guard), fit_seconds=time.perf_counter() - started)
    graph = step_rule_graph(rule, "reject_option", doc=f"reject-option classification, t={threshold:.4g}, "
                                                        f"m={margin:.4g}, favoured={report.favoured}")
    patch = Patch.build(method="reject_option", n_classes=2, groups=list(data.group_names), group_at_inference=True,
                        output_transform=graph,
                        params={"criterion": criterion, "threshold": threshold, "margin": margin,
                                "favoured": report.favoured, **rule.to_json()},
                        report=report.model_dump(exclude={"fit_seconds"} | guard_exclude(guard)))
    return FitResult(patch, report)


METHOD = Method(
    name="reject_option",
    summary=("reject-option classification (Kamiran et al. 2012): flip decisions in a band around the "
             "threshold, per group, like AIF360's"),
    access=("queries",), options=RejectOptionOptions, fit=fit, group_at_inference="required", bench=BENCH)
