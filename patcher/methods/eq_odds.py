"""Equalized-odds post-processing (Hardt, Price, Srebro, NeurIPS 2016), the linear program AIF360 solves.

The model's own decision d = [p(1) > 0.5] is kept or flipped at random, per group:
a_g = P(out = 1 | d = 1, g), b_g = P(out = 1 | d = 0, g). Every rate of the output is linear in
(a, b), e.g. TPR'_g = a_g TPR_g + b_g (1 - TPR_g), so one linear program over the 2G mixing
probabilities (scipy's HiGHS) finds the best rule whose TPR and FPR (eo), TPR (eopp) or selection
rate (dp) are equal across groups. Objective `error` is the paper's (expected 0-1 loss on the tune
rows); `balanced` is AIF360's (the sum over groups of FPR' + FNR', every group weighted alike).
Any number of groups. The patch draws u per row from the request id (reproducible decisions).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from patcher.methods.contract import FitRequest, FitResult, Method
from patcher.methods.postprocess_common import (
    BENCH,
    Criterion,
    Scored,
    StepRule,
    check_criterion,
    guard_exclude,
    guard_field,
    guard_refused,
    guard_report,
    guard_rule,
    score_tune,
    step_rule_graph,
)
from patcher.metrics import criterion_gap, decision_rates
from patcher.oracle import Oracle
from patcher.patch import Patch
from patcher.tuning import TuningData

CRITERIA = ("eo", "eopp", "dp")


class EqOddsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    objective: Literal["error", "balanced"] = Field(
        "error", description="error: expected 0-1 loss on the tune rows (the paper); balanced: the sum over "
        "groups of FPR + FNR (AIF360)")
    threshold: float = Field(0.5, gt=0, lt=1, description="the model's decision: p(1) > threshold")
    guard: float | None = guard_field()


class EqOddsReport(BaseModel):
    method: str = "eq_odds"
    criterion: Criterion
    objective: str
    queries_used: int
    group_at_inference: bool = True
    mixing: dict[str, dict[str, float]]  # group -> {"p_keep_positive": a_g, "p_flip_negative": b_g}
    lp_status: str
    tune_before: dict[str, float]
    tune_after: dict[str, float]  # expected figures of the randomized rule on the tune rows
    guard: dict[str, Any] | None = None  # the cross-fitted comparison with no patch (option guard)
    warning: str | None = None
    fit_seconds: float


def solve_mixing(rates: dict[str, np.ndarray], weight: np.ndarray, base_rate: np.ndarray, criterion: str,
                 objective: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The LP over x = (a_0, b_0, a_1, b_1, ...). rates: per-group sr/tpr/fpr of the model's decision;
    weight: group shares of the rows; base_rate: per-group P(y = 1). Returns (a, b, status)."""
    from scipy.optimize import linprog

    G = len(weight)

    def row(rate: np.ndarray, g: int) -> np.ndarray:
        r = np.zeros(2 * G)
        r[2 * g], r[2 * g + 1] = rate[g], 1.0 - rate[g]  # rate' = a r + b (1 - r)
        return r

    keys = {"eo": ("tpr", "fpr"), "eopp": ("tpr",), "dp": ("sr",)}[criterion]
    A_eq = [row(rates[k], g) - row(rates[k], 0) for k in keys for g in range(1, G)]
    c = np.zeros(2 * G)
    for g in range(G):
        if objective == "error":  # P(g) [(1 - pi_g) FPR'_g - pi_g TPR'_g] + const
            c += weight[g] * ((1 - base_rate[g]) * row(rates["fpr"], g) - base_rate[g] * row(rates["tpr"], g))
        else:  # FPR'_g + FNR'_g = FPR'_g - TPR'_g + 1
            c += row(rates["fpr"], g) - row(rates["tpr"], g)
    res = linprog(c, A_eq=np.array(A_eq) if A_eq else None, b_eq=np.zeros(len(A_eq)) if A_eq else None,
                  bounds=[(0.0, 1.0)] * (2 * G), method="highs")
    if res.x is None:
        raise ValueError(f"the equalized-odds linear program has no solution: {res.message}")
    x = np.clip(res.x, 0.0, 1.0)
    return x[0::2], x[1::2], str(res.message)


def mixing_rule(s: Scored, criterion: str, opts: EqOddsOptions) -> tuple[StepRule, np.ndarray, np.ndarray, str]:
    """The LP's rule on scored rows `s`: (rule, a, b, the solver's status)."""
    G = s.n_groups
    cut = float(np.log(opts.threshold / (1 - opts.threshold)))
    d = (s.margin > cut).astype(np.float64)
    rates = decision_rates(d, s.y, s.groups, G)
    weight = np.bincount(s.groups, minlength=G) / len(s.groups)
    base_rate = np.array([s.y[s.groups == g].mean() for g in range(G)])
    a, b, status = solve_mixing(rates, weight, base_rate, criterion, opts.objective)
    return _keep_or_flip(a, b, cut), a, b, status


def _keep_or_flip(a: np.ndarray, b: np.ndarray, cut: float) -> StepRule:
    # P(1 | m, g) = b_g + (a_g - b_g) [m > cut]
    return StepRule(np.stack([np.full(len(a), cut), np.full(len(a), 1e30)], 1), np.stack([a - b, np.zeros(len(a))], 1),
                    b)


def fit(access: Oracle, data: TuningData, request: FitRequest, opts: EqOddsOptions) -> FitResult:
    """Solve the mixing LP on the tune rows; the patch needs the group at inference."""
    criterion = request.criterion
    check_criterion(criterion, CRITERIA, "eq_odds")
    started = time.perf_counter()
    s = score_tune(access, data, request)
    G = s.n_groups
    cut = float(np.log(opts.threshold / (1 - opts.threshold)))
    d = (s.margin > cut).astype(np.float64)
    rule, a, b, status = mixing_rule(s, criterion, opts)
    guard = guard_rule(s, criterion, opts.guard, lambda part: mixing_rule(part, criterion, opts)[0], request, cut)
    if guard_refused(guard):  # no patch: every group keeps the model's decision
        a, b = np.ones(G), np.zeros(G)
        rule = _keep_or_flip(a, b, cut)
    expected = rule.prob(s.margin, s.groups)
    report = EqOddsReport(
        criterion=criterion, objective=opts.objective, queries_used=s.queries_used,
        mixing={data.group_names[g]: {"p_keep_positive": float(a[g]), "p_flip_negative": float(b[g])}
                for g in range(G)},
        lp_status=status,
        tune_before={"accuracy": float(np.mean(d == s.y)), criterion: criterion_gap(d, s.y, s.groups, G, criterion)},
        tune_after={"accuracy": float(np.mean(np.where(s.y == 1, expected, 1 - expected))),
                    criterion: criterion_gap(expected, s.y, s.groups, G, criterion)},
        **guard_report(guard), fit_seconds=time.perf_counter() - started)
    graph = step_rule_graph(rule, "eq_odds", doc=f"equalized-odds post-processing, criterion={criterion}, "
                                                 f"objective={opts.objective}")
    patch = Patch.build(method="eq_odds", n_classes=2, groups=list(data.group_names), group_at_inference=True,
                        output_transform=graph, params={"criterion": criterion, "threshold": opts.threshold,
                                                        "a": a.tolist(), "b": b.tolist()},
                        report=report.model_dump(exclude={"fit_seconds"} | guard_exclude(guard)))
    return FitResult(patch, report)


METHOD = Method(
    name="eq_odds",
    summary=("equalized-odds post-processing by linear program (Hardt et al. 2016): keep or flip the model's "
             "decision at random per group, like AIF360's"),
    access=("queries",), options=EqOddsOptions, fit=fit, group_at_inference="required", bench=BENCH)
