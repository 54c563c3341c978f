"""Calibrated equalized odds (Pleiss, Raghavan, Wu, Kleinberg, Weinberger, NeurIPS 2017; as in AIF360).

Keeps the scores calibrated and equalises one cost across groups: generalized FPR (mean p(1) over a
group's negatives), generalized FNR (mean 1 - p(1) over its positives), or a weighted sum of both
(`cost_constraint` fpr, fnr, weighted; weighted scales them by (1 - base rate) and base rate, as
AIF360 does). The cheaper groups are made as costly as the costliest one by replacing, with
probability mix_g, a row's score by the group's base rate (the trivial calibrated classifier):
mix_g = (cost_max - cost_g) / (trivial_cost_g - cost_g). The decision is p(1) >= 0.5 on the new
score. Any number of groups; a group whose trivial classifier is cheaper than cost_max cannot
reach it and is mixed fully (reported). The draw per row comes from the request id.
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
    logit,
    score_mix_graph,
    score_tune,
)
from patcher.metrics import criterion_gap
from patcher.oracle import Oracle
from patcher.patch import Patch
from patcher.tuning import TuningData

CRITERIA = ("eo", "eopp")
CostConstraint = Literal["fpr", "fnr", "weighted"]


class CalibratedEqOddsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cost_constraint: CostConstraint | None = Field(
        None, description="the cost equalised across groups: fpr, fnr or weighted (default: fnr for eopp, "
        "weighted for eo)")
    guard: float | None = guard_field()


class CalibratedEqOddsReport(BaseModel):
    method: str = "calibrated_eq_odds"
    criterion: Criterion
    cost_constraint: CostConstraint
    queries_used: int
    group_at_inference: bool = True
    base_rates: dict[str, float]
    costs: dict[str, float]
    trivial_costs: dict[str, float]
    mix_rates: dict[str, float]
    unreachable: list[str]  # groups whose trivial classifier costs less than the target
    tune_before: dict[str, float]
    tune_after: dict[str, float]  # expected figures on the tune rows
    guard: dict[str, Any] | None = None  # the cross-fitted comparison with no patch (option guard)
    warning: str | None = None
    fit_seconds: float


def group_cost(prob: np.ndarray, y: np.ndarray, base_rate: float, constraint: str) -> float:
    gfpr = float(prob[y == 0].mean())
    gfnr = float((1 - prob[y == 1]).mean())
    if constraint == "fpr":
        return gfpr
    if constraint == "fnr":
        return gfnr
    return 0.5 * (gfpr * (1 - base_rate) + gfnr * base_rate)


# p >= 0.5 as a strict cut on the margin (StepRule decides m > cut): the largest float below 0
AT_HALF = float(np.nextafter(0.0, -1.0))


def mixing(s: Scored, constraint: str):
    """On scored rows `s`: (base rates, costs, trivial classifiers' costs, mix rates, groups that cannot reach the
    target cost), per group."""
    G, prob = s.n_groups, s.prob
    base = np.array([s.y[s.groups == g].mean() for g in range(G)])
    cost = np.array([group_cost(prob[s.groups == g], s.y[s.groups == g], base[g], constraint) for g in range(G)])
    trivial = np.array([group_cost(np.full((s.groups == g).sum(), base[g]), s.y[s.groups == g], base[g],
                                   constraint) for g in range(G)])
    target = cost.max()
    with np.errstate(divide="ignore", invalid="ignore"):
        mix = np.where(cost < target, (target - cost) / (trivial - cost), 0.0)
    unreachable = [g for g in range(G) if not 0.0 <= mix[g] <= 1.0]
    mix = np.clip(np.nan_to_num(mix, nan=1.0, posinf=1.0, neginf=1.0), 0.0, 1.0)
    return base, cost, trivial, mix, unreachable


def _mix_rule(base: np.ndarray, mix: np.ndarray) -> StepRule:
    """The patch's decisions as a step rule (for the guard): the model's p >= 0.5 with probability 1 - mix, the
    group's trivial decision (base rate >= 0.5) with probability mix."""
    trivial = (base >= 0.5).astype(np.float64)
    G = len(base)
    return StepRule(np.stack([np.full(G, AT_HALF), np.full(G, 1e30)], 1), np.stack([1 - mix, np.zeros(G)], 1),
                    mix * trivial)


def fit(access: Oracle, data: TuningData, request: FitRequest, opts: CalibratedEqOddsOptions) -> FitResult:
    """Mixing rates from the tune rows' scores and labels; the patch needs the group at inference."""
    criterion = request.criterion
    check_criterion(criterion, CRITERIA, "calibrated_eq_odds (it has no demographic-parity form)")
    constraint: CostConstraint = opts.cost_constraint or ("fnr" if criterion == "eopp" else "weighted")
    started = time.perf_counter()
    s = score_tune(access, data, request)
    G, prob = s.n_groups, s.prob
    base, cost, trivial, mix, unreachable = mixing(s, constraint)

    def fold_rule(part: Scored) -> StepRule:
        fold_base, _, _, fold_mix, _ = mixing(part, constraint)
        return _mix_rule(fold_base, fold_mix)

    guard = guard_rule(s, criterion, opts.guard, fold_rule, request, AT_HALF)
    if guard_refused(guard):  # no patch: no group's scores are mixed
        mix = np.zeros(G)
    unreachable = [data.group_names[g] for g in unreachable]
    d0 = (prob >= 0.5).astype(np.float64)
    trivial_decision = (base >= 0.5).astype(np.float64)[s.groups]
    expected = (1 - mix[s.groups]) * d0 + mix[s.groups] * trivial_decision
    names = list(data.group_names)
    report = CalibratedEqOddsReport(
        criterion=criterion, cost_constraint=constraint, queries_used=s.queries_used,
        base_rates=dict(zip(names, base.tolist(), strict=True)), costs=dict(zip(names, cost.tolist(), strict=True)),
        trivial_costs=dict(zip(names, trivial.tolist(), strict=True)),
        mix_rates=dict(zip(names, mix.tolist(), strict=True)), unreachable=unreachable,
        tune_before={"accuracy": float(np.mean(d0 == s.y)), criterion: criterion_gap(d0, s.y, s.groups, G, criterion)},
        tune_after={"accuracy": float(np.mean(np.where(s.y == 1, expected, 1 - expected))),
                    criterion: criterion_gap(expected, s.y, s.groups, G, criterion)},
        **guard_report(guard), fit_seconds=time.perf_counter() - started)
    # the base rate as a margin; ties at p = 0.5 decide positive, as p >= 0.5 does
    replacement = np.where(base >= 0.5, np.maximum(logit(base), 1e-6), logit(base))
    graph = score_mix_graph(mix, replacement, "calibrated_eq_odds",
                            doc=f"calibrated equalized odds, cost constraint {constraint}")
    patch = Patch.build(method="calibrated_eq_odds", n_classes=2, groups=names, group_at_inference=True,
                        output_transform=graph,
                        params={"criterion": criterion, "cost_constraint": constraint, "mix_rates": mix.tolist(),
                                "base_rates": base.tolist()},
                        report=report.model_dump(exclude={"fit_seconds"} | guard_exclude(guard)))
    return FitResult(patch, report)


METHOD = Method(
    name="calibrated_eq_odds",
    summary=("calibrated equalized odds (Pleiss et al. 2017): mix a group's scores with its base rate, like "
             "AIF360's"),
    access=("queries",), options=CalibratedEqOddsOptions, fit=fit, group_at_inference="required", bench=BENCH,
    criteria=CRITERIA)
