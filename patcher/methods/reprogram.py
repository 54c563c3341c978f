"""Fairness Reprogramming: learn an input trigger that makes a frozen model fairer (the trigger method's fit).

The model is never changed: the patch is an input transform x~ = m(x; theta) that the gateway applies
before the upstream call (tabular: x * mask + delta; images: an added border, a replaced frame, a corner
patch or a global color mix; see reprogram_triggers), optionally followed by a re-tuned decision
threshold (binary tasks). Two ways to learn it:

- gradient access (`access` is a ModelArtifact): backpropagate through the model (ONNX -> torch via
  onnx2torch); the alternating min-max with a discriminator and the projected gradient, or a direct
  rate-gap penalty (reprogram_gradient);
- zeroth-order access (`access` is an Oracle, or the request's access is "zeroth_order"): scores only,
  every row counted against the budget. Tabular triggers (`zo_surrogate`, the default there): a surrogate
  distilled from queries, one trigger per `zo_lams` trained on it with gradients, the candidate and
  threshold chosen on real scores (reprogram_surrogate); otherwise randomized antithetic gradient estimates
  on a low-dimensional trigger, the best trigger seen kept (reprogram_zo); `zo_trigger` gives it its own form.

lam trades accuracy for fairness. With `lam` unset, gradient access trains one trigger per value of
`lams` and keeps the one whose operating point (on the tuning rows) `select` prefers; the surrogate
does the same over `zo_lams`; the estimate search trains one trigger at `lam_zo` (its budget is too
small to split).

`select` says how the trigger (lambda or evaluated candidate) and the threshold are chosen on the
selection rows: `fairest` (least unfairness within the accuracy cap, then accuracy) or `worst_cell` (the
best worst (group, label) cell accuracy among the points whose unfairness is at most `unfairness_ratio` x
the model's there; when no point reaches that, the least unfair one, and the report's
`selection.target_met` is false). Both access kinds use the same rule. The selection rows are the `holdout`
share of the tuning rows, or, for gradient access with `select_folds` k >= 2, every tuning row scored out of
fold (cross-fitting: k triggers per lambda, then the chosen lambda retrained on all rows).

`balance` weighs every (group, label) cell equally in the utility loss and in the accuracy that
selects the trigger and threshold: for a deployment where the group says nothing about the label
while it does on the tuning rows (a shortcut, e.g. colored digits), plain tuning accuracy rewards
the very shortcut the patch must remove.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from patcher.access import ModelArtifact
from patcher.device import torch_device
from patcher.methods.contract import FitRequest, FitResult
from patcher.methods.reprogram_fairness import (
    Criterion,
    cell_weights,
    operating_point,
    worst_cell_point,
)
from patcher.methods.reprogram_gradient import model_logits, train_trigger
from patcher.methods.reprogram_surrogate import surrogate_candidates
from patcher.methods.reprogram_triggers import (
    BorderTrigger,
    ColorTrigger,
    FrameTrigger,
    PatchTrigger,
    TabularTrigger,
    Trigger,
    group_columns,
)
from patcher.methods.reprogram_zo import ZOTrainer
from patcher.methods.trigger import TriggerOptions
from patcher.metrics import criterion_gap
from patcher.onnx_graphs import GraphBuilder, float_tensor
from patcher.oracle import Oracle
from patcher.patch import Patch
from patcher.scores import log_softmax
from patcher.tuning import TuningData, stratified_split


class FitReport(BaseModel):
    method: str = "trigger"
    access: str
    criterion: Criterion
    trigger: dict
    lam: float
    threshold: float
    queries_used: int
    steps: int
    tune_before: dict[str, float]
    tune_after: dict[str, float]
    candidates: list[dict]  # per lambda (gradient) or evaluation (zeroth order): tuning accuracy, unfairness
    selection: dict = Field(default_factory=dict)  # the rule that chose, its unfairness target, whether it was met
    fit_seconds: float


def make_trigger(X: np.ndarray, groups: np.ndarray, opts: TriggerOptions, access: str, seed: int = 0) -> Trigger:
    form = opts.zo_trigger if access == "zeroth_order" and opts.zo_trigger is not None else opts.trigger
    form = form if form != "auto" else ("tabular" if X.ndim == 2 else "border")
    if form == "tabular":
        if X.ndim != 2:
            raise ValueError(f"a tabular trigger needs [N, d] inputs, got {list(X.shape)}")
        cols = opts.columns
        if cols is None and access == "zeroth_order":
            cols = group_columns(X, groups, min(opts.zo_columns, X.shape[1]))
        if cols is not None and not all(0 <= c < X.shape[1] for c in cols):
            raise ValueError(f"trigger columns must be in [0, {X.shape[1]})")
        return TabularTrigger(X.shape[1], cols, opts.mask)
    if form == "color":  # channels first, any number of spatial axes
        if X.ndim < 3:
            raise ValueError(f"a color trigger needs [N, C, *spatial] inputs, got {list(X.shape)}")
        return ColorTrigger(X.shape[1:])
    if X.ndim != 4:
        raise ValueError(f"an image trigger needs [N, C, H, W] inputs, got {list(X.shape)}")
    block = 1 if access == "gradient" else opts.border_block
    if form == "border":
        return BorderTrigger(X.shape[1:], opts.border_width, block)
    if form == "frame":
        return FrameTrigger(X.shape[1:], opts.border_width, block, opts.init_scale, seed)
    return PatchTrigger(X.shape[1:], opts.patch_size)


def threshold_graph(n_classes: int, threshold: float) -> bytes:
    """patched = log_probs - [0, threshold]: argmax is the decision margin > threshold."""
    g = GraphBuilder()
    g.op("Add", ["log_probs", g.const(np.array([0.0, -threshold], np.float32), "shift")], "patched_log_probs")
    m = g.model([float_tensor("log_probs", ["N", n_classes])], [float_tensor("patched_log_probs", ["N", n_classes])],
                "trigger_threshold", doc=f"decision threshold {threshold:.6g} on log p1 - log p0")
    return m.SerializeToString()


@dataclass(frozen=True)
class Choice:
    """The candidate (lambda or evaluated trigger) and threshold chosen on the selection rows."""

    key: int  # index of the candidate
    threshold: float
    accuracy: float  # cell-balanced with `balance`
    unfairness: float
    base_unfairness: float  # the model's own, on the same rows
    summary: list[dict]  # per candidate: accuracy, unfairness, threshold
    selection: dict  # the rule that chose, its unfairness target, whether it was met


@dataclass(frozen=True)
class TriggerFit:
    """One access kind's training result."""

    theta: torch.Tensor
    lam: float
    threshold: float
    steps: int
    queries: int
    tune: dict  # n_classes, base_acc, base_unfair, acc, unfair on the selection rows
    candidates: list[dict]
    selection: dict


def _choose(logps: list[tuple[int, np.ndarray]], base: np.ndarray, y: np.ndarray, groups: np.ndarray, G: int,
            criterion: Criterion, opts: TriggerOptions) -> Choice:
    """The fairest candidate within the accuracy cap on tuning rows (accuracy cell-balanced with `opts.balance`)."""
    w = cell_weights(y, groups) if opts.balance else np.ones(len(y))
    base_pred = base.argmax(1)
    base_acc = float(np.average(base_pred == y, weights=w))
    base_unfair = criterion_gap(base_pred, y, groups, G, criterion)
    C = base.shape[1]
    if C == 2 and opts.threshold:
        key, thr, acc, unf, summary = operating_point(
            [(k, lp[:, 1] - lp[:, 0]) for k, lp in logps], y, groups, G, criterion, base_acc,
            opts.fairness_tolerance, opts.max_accuracy_drop, w if opts.balance else None)
        return Choice(int(key), thr, acc, unf, base_unfair, summary, {"rule": "fairest"})
    best, best_key, summary = None, None, []
    for k, lp in logps:
        pred = lp.argmax(1)
        acc, unf = float(np.average(pred == y, weights=w)), criterion_gap(pred, y, groups, G, criterion)
        summary.append({"key": k, "accuracy": acc, "unfairness": unf, "threshold": 0.0})
        within = opts.max_accuracy_drop is None or acc >= base_acc - opts.max_accuracy_drop
        rank = (not within, max(unf, opts.fairness_tolerance), -acc)
        if best_key is None or rank < best_key:
            best_key, best = rank, (k, acc, unf)
    return Choice(best[0], 0.0, best[1], best[2], base_unfair, summary, {"rule": "fairest"})


def _select(logps: list[tuple[int, np.ndarray]], base: np.ndarray, y: np.ndarray, groups: np.ndarray, G: int,
            criterion: Criterion, opts: TriggerOptions) -> Choice:
    """The choice by the options' rule; y and groups are the selection rows (the held-out tuning rows with
    `holdout`), never the test split."""
    rule, ratio = opts.selection()
    if rule == "worst_cell" and opts.threshold and base.shape[1] == 2:
        base_unfair = criterion_gap(base.argmax(1), y, groups, G, criterion)
        target = ratio * base_unfair
        k, thr, acc, unf, summary = worst_cell_point(
            [(i, lp[:, 1] - lp[:, 0]) for i, lp in logps], y, groups, G, criterion, target,
            cell_weights(y, groups) if opts.balance else None)
        # target not met: worst_cell_point fell back on the least unfair point; say so
        return Choice(int(k), thr, acc, unf, base_unfair, summary, {
            "rule": "worst_cell", "unfairness_target": target, "target_met": bool(unf <= target)})
    choice = _choose(logps, base, y, groups, G, criterion, opts)
    if rule == "worst_cell":
        choice.selection["note"] = "worst_cell needs a binary task with a re-tuned threshold: chose the fairest"
    return choice


def fit_trigger(access: Oracle | ModelArtifact, data: TuningData, request: FitRequest,
                opts: TriggerOptions) -> FitResult:
    """Learn a fairness trigger on the tuning data (see the module docstring)."""
    criterion, seed, budget, report_progress = request.criterion, request.seed, request.budget, request.report
    if criterion not in ("dp", "eo", "eopp"):
        raise ValueError(f"unknown criterion {criterion!r}; choose dp, eo or eopp")
    kind = request.access or ("gradient" if isinstance(access, ModelArtifact) else "zeroth_order")
    if kind not in ("gradient", "zeroth_order"):
        raise ValueError(f"a trigger learns with gradient or zeroth_order access, not {kind!r}")
    if kind == "gradient" and not isinstance(access, ModelArtifact):
        raise ValueError("access 'gradient' needs the model's ONNX artifact; an endpoint alone gives scores "
                         "only: use access 'zeroth_order'")
    started = time.perf_counter()
    X = np.asarray(data.X, np.float32)
    y, groups, G = np.asarray(data.y, np.int64), np.asarray(data.groups, np.int64), data.n_groups
    trigger = make_trigger(X, groups, opts, kind, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads cost more than they save on a shared CPU
    try:
        if kind == "gradient":
            result = _fit_gradient(access, trigger, X, y, groups, G, criterion, opts, seed, report_progress,
                                   torch_device(request.device))
        else:
            oracle = access.oracle(budget, request.device) if isinstance(access, ModelArtifact) else access
            result = _fit_zo(oracle, trigger, X, y, groups, G, criterion, budget, opts, seed, report_progress)
    finally:
        torch.set_num_threads(threads)
    theta, lam, thr, tune = result.theta, result.lam, result.threshold, result.tune
    report_progress(0.97, {"stage": "exporting the patch", "lam": lam, "threshold": thr})
    C = tune["n_classes"]
    report = FitReport(
        access=kind, criterion=criterion, trigger=trigger.describe(theta), lam=lam, threshold=thr,
        queries_used=result.queries, steps=result.steps,
        tune_before={"accuracy": tune["base_acc"], criterion: tune["base_unfair"]},
        tune_after={"accuracy": tune["acc"], criterion: tune["unfair"]}, candidates=result.candidates,
        selection=result.selection, fit_seconds=time.perf_counter() - started)
    patch = Patch.build(
        method="trigger", n_classes=C, groups=list(data.group_names), group_at_inference=False,
        input_transform=trigger.to_onnx(theta),
        output_transform=threshold_graph(C, thr) if C == 2 and thr != 0.0 else None,
        params={"access": kind, "criterion": criterion, "lam": lam, "threshold": thr,
                "trigger": trigger.describe(theta)},
        report=report.model_dump(exclude={"candidates", "fit_seconds"}))
    return FitResult(patch, report)


def _accuracy(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, opts: TriggerOptions) -> float:
    w = cell_weights(y, groups) if opts.balance else None
    return float(np.average(logp.argmax(1) == y, weights=w))


def crossfit_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per row, every (group, label) cell dealt round-robin after a shuffle, so each fold
    holds about 1/k of every cell (the minority cells decide the selection)."""
    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    cells = groups * (int(y.max()) + 1) + y
    rng, folds = np.random.default_rng([seed, 11]), np.empty(len(y), np.int64)
    start = 0  # deal each cell from where the last one stopped: fold sizes differ by one row at most
    for c in np.unique(cells):
        rows = rng.permutation(np.flatnonzero(cells == c))
        folds[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return folds


def _train(model, trigger: Trigger, X, y, groups, G, criterion, lam: float, C: int, opts: TriggerOptions, seed: int,
           report_progress, unit: int, units: int, device: torch.device) -> torch.Tensor:
    """One trigger trained with gradients on these rows; progress reported as training unit `unit` of `units`."""
    def tick(step: int) -> None:
        if step % 50 == 0:
            report_progress(0.05 + 0.9 * (unit + step / opts.steps) / units, {"stage": "training", "lam": lam,
                                                                              "step": step})
    return train_trigger(model, trigger, X, y, groups, G, criterion, lam, steps=opts.steps,
                         batch_size=min(opts.batch_size, len(X)), lr=opts.lr, adv_lr=opts.adv_lr,
                         fairness=opts.fairness, seed=seed, n_classes=C, tick=tick,
                         weights=cell_weights(y, groups) if opts.balance else None, device=device)


def selection_split(y: np.ndarray, groups: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection rows, training rows): `holdout` of every (group, label) cell kept out of trigger training to
    choose lambda, the evaluated trigger and the threshold on; holdout 0: every row is both."""
    if holdout <= 0:
        everything = np.arange(len(y))
        return everything, everything
    return stratified_split(y, groups, holdout, [seed, 7])


def _fit_gradient(artifact: ModelArtifact, trigger: Trigger, X, y, groups, G, criterion, opts, seed: int,
                  report_progress, device: torch.device) -> TriggerFit:
    model = artifact.torch_module().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if opts.select_folds >= 2:
        return _fit_gradient_crossfit(model, trigger, X, y, groups, G, criterion, opts, seed, report_progress, device)
    sel, fit_rows = selection_split(y, groups, opts.holdout, seed)
    Xs, ys, gs = X[sel], y[sel], groups[sel]
    X, y, groups = X[fit_rows], y[fit_rows], groups[fit_rows]
    base = log_softmax(model_logits(model, Xs, device=device))
    C = base.shape[1]
    lams = [opts.lam] if opts.lam is not None else list(opts.lams)
    thetas, logps = [], []
    for i, lam in enumerate(lams):
        theta = _train(model, trigger, X, y, groups, G, criterion, lam, C, opts, seed, report_progress, i, len(lams),
                       device)
        thetas.append(theta)
        logps.append((i, log_softmax(model_logits(model, Xs, trigger, theta, device=device))))
    c = _select(logps, base, ys, gs, G, criterion, opts)
    for s in c.summary:
        s["lam"] = lams[s.pop("key")]
    tune = {"n_classes": C, "base_acc": _accuracy(base, ys, gs, opts), "base_unfair": c.base_unfairness,
            "acc": c.accuracy, "unfair": c.unfairness}
    return TriggerFit(thetas[c.key], float(lams[c.key]), c.threshold, opts.steps * len(lams), 0, tune, c.summary,
                      c.selection)


def _fit_gradient_crossfit(model, trigger: Trigger, X, y, groups, G, criterion, opts, seed: int,
                           report_progress, device: torch.device) -> TriggerFit:
    """Cross-fitted selection: every tuning row is scored by triggers that did not train on it, so the rule
    (lambda and threshold) sees all the rows instead of a 30% holdout (a holdout leaves ~40 rows per minority
    cell, and the point the rule picks is where their noise flatters it most). The final trigger is the chosen
    lambda trained on all rows: the fold triggers each saw (k-1)/k of the rows, and an input transform cannot
    average several of them without k model calls per request."""
    K = opts.select_folds
    folds = crossfit_folds(y, groups, K, seed)
    base = log_softmax(model_logits(model, X, device=device))
    C = base.shape[1]
    lams = [opts.lam] if opts.lam is not None else list(opts.lams)
    units = len(lams) * K + 1

    def train(rows: np.ndarray, lam: float, unit: int) -> torch.Tensor:
        return _train(model, trigger, X[rows], y[rows], groups[rows], G, criterion, lam, C, opts, seed,
                      report_progress, unit, units, device)

    logps = []
    for i, lam in enumerate(lams):
        oof = np.empty_like(base)
        for f in range(K):
            theta = train(np.flatnonzero(folds != f), lam, i * K + f)
            held = np.flatnonzero(folds == f)
            oof[held] = log_softmax(model_logits(model, X[held], trigger, theta, device=device))
        logps.append((i, oof))
    c = _select(logps, base, y, groups, G, criterion, opts)
    c.selection.update(folds=K, selection_rows=len(y))
    for s in c.summary:
        s["lam"] = lams[s.pop("key")]
    theta = train(np.arange(len(y)), lams[c.key], units - 1)
    tune = {"n_classes": C, "base_acc": _accuracy(base, y, groups, opts), "base_unfair": c.base_unfairness,
            "acc": c.accuracy, "unfair": c.unfairness}  # out-of-fold: the final trigger's own rows would flatter it
    return TriggerFit(theta, float(lams[c.key]), c.threshold, opts.steps * units, 0, tune, c.summary, c.selection)


def warm_start(trigger: Trigger, X: np.ndarray, opts: TriggerOptions) -> np.ndarray | None:
    """Zeroth order, tabular with `zo_impute` t > 0: each trigger column starts at x * (1 - t) + t * mean(x) (tuning
    rows; no queries). At t = 1 the columns most correlated with the group are replaced by their means, so the
    model cannot read the group from them; the search then restores what the label needs."""
    t = opts.zo_impute
    if t <= 0 or not isinstance(trigger, TabularTrigger):
        return None
    mean = X[:, trigger.columns].astype(np.float64).mean(0)
    if trigger.mask_kind == "scale":
        return np.concatenate([np.full(trigger.k, 1.0 - t), t * mean])
    # a binary mask cannot blend: t >= 0.5 replaces the columns by their means (mask logit -3), less keeps them
    return np.concatenate([np.full(trigger.k, -3.0), mean]) if t >= 0.5 else None


def _fit_zo(oracle: Oracle, trigger: Trigger, X, y, groups, G, criterion, budget, opts, seed: int,
            report_progress) -> TriggerFit:
    remaining = getattr(oracle, "remaining", None)
    limits = [b for b in (budget, remaining) if b is not None]
    limit = min(limits) if limits else 20_000
    search = opts.zo_search(isinstance(trigger, TabularTrigger))
    if isinstance(trigger, TabularTrigger) and search["zo_surrogate"]:
        return _fit_zo_surrogate(oracle, trigger, X, y, groups, G, criterion, limit, opts, search, seed,
                                 report_progress)
    sel, fit_rows = selection_split(y, groups, opts.holdout, seed)
    eval_size = min(opts.eval_size, len(sel), max(limit // (4 * (opts.evals + 1)), 50))
    C_guess = int(y.max()) + 1
    trainer = ZOTrainer(oracle, trigger, X, y, groups, G, criterion, search["lam_zo"] if opts.lam is None else opts.lam,
                        fairness=opts.fairness, q=opts.q, mu=opts.mu, lr=search["zo_lr"],
                        batch_size=min(search["zo_batch"], len(X)), eval_size=eval_size, evals=opts.evals,
                        seed=seed, n_classes=max(C_guess, 2),
                        holdout=(fit_rows, sel) if opts.holdout > 0 else None, restarts=opts.zo_restarts,
                        restart_rows=opts.zo_restart_rows, unbiased_gap=opts.zo_unbiased_gap,
                        subspace=opts.zo_subspace, start=warm_start(trigger, X[fit_rows], opts),
                        reweight=search["zo_reweight"] and not opts.balance, matched=search["zo_matched"])
    evaluations = 2 if trainer.starts_at_model() else 3  # a start that is not the model: the model scored too
    need = eval_size * evaluations + trainer.step_cost() + trainer.restarts * trainer.restart_rows()
    if limit < need:
        raise ValueError(f"a budget of {limit} queries is too small for a zeroth-order trigger: it needs at least "
                         f"{need} ({evaluations} evaluations of {eval_size} rows, the starts and one step)")
    used_before = oracle.queries_used
    report_progress(0.02, {"stage": "training", "queries_used": 0})
    result = trainer.run(limit, lambda f, info: report_progress(0.02 + 0.9 * f, {"stage": "training", **info}))
    rows = result.eval_rows
    logps = [(i, lp) for i, (_, _, lp) in enumerate(result.candidates)]
    rule = opts.model_copy(update={"fairness_tolerance": search["zo_fairness_tolerance"],
                                   "max_accuracy_drop": search["zo_max_accuracy_drop"]})
    c = _select(logps, result.base_log_probs, y[rows], groups[rows], G, criterion, rule)
    if c.selection["rule"] == "fairest":
        c.selection.update(fairness_tolerance=rule.fairness_tolerance, max_accuracy_drop=rule.max_accuracy_drop)
    for s, hist in zip(c.summary, result.history, strict=True):
        s.update(hist)
        s.pop("key")
    base = result.base_log_probs
    tune = {"n_classes": base.shape[1], "base_acc": _accuracy(base, y[rows], groups[rows], opts),
            "base_unfair": c.base_unfairness, "acc": c.accuracy, "unfair": c.unfairness}
    theta = torch.tensor(result.candidates[c.key][1])
    return TriggerFit(theta, float(trainer.lam), c.threshold, result.steps, oracle.queries_used - used_before, tune,
                      c.summary, c.selection)


def _fit_zo_surrogate(oracle: Oracle, trigger: TabularTrigger, X, y, groups, G, criterion, limit: int, opts,
                      search: dict, seed: int, report_progress) -> TriggerFit:
    """Zeroth order through a distilled surrogate (reprogram_surrogate): one trigger per `zo_lams` (or `lam`),
    chosen with its threshold on real scores of the surrogate's unperturbed rows."""
    lams = [opts.lam] if opts.lam is not None else list(opts.zo_lams)
    need = 200 * len(lams)  # at least 50 surrogate rows and 50 selection rows per candidate
    if limit < need:
        raise ValueError(f"a budget of {limit} queries is too small for a zeroth-order surrogate trigger with "
                         f"{len(lams)} candidates: it needs at least {need}")
    used_before = oracle.queries_used
    report_progress(0.02, {"stage": "querying", "queries_used": 0})
    rows, base, cands = surrogate_candidates(
        oracle, trigger, X, y, groups, G, criterion, lams, limit, seed, steps=opts.steps, batch_size=opts.batch_size,
        lr=opts.lr, fairness=opts.fairness, adv_lr=opts.adv_lr,
        weights=cell_weights(y, groups) if opts.balance else None,
        tick=lambda f, info: report_progress(0.02 + 0.9 * f, info))
    rule = opts.model_copy(update={"fairness_tolerance": search["zo_fairness_tolerance"],
                                   "max_accuracy_drop": search["zo_max_accuracy_drop"]})
    c = _select([(i, lp) for i, (_, _, lp) in enumerate(cands)], base, y[rows], groups[rows], G, criterion, rule)
    c.selection.update(surrogate=True, selection_rows=len(rows))
    if c.selection["rule"] == "fairest":
        c.selection.update(fairness_tolerance=rule.fairness_tolerance, max_accuracy_drop=rule.max_accuracy_drop)
    for s in c.summary:
        s["lam"] = cands[s.pop("key")][0]
    tune = {"n_classes": base.shape[1], "base_acc": _accuracy(base, y[rows], groups[rows], opts),
            "base_unfair": c.base_unfairness, "acc": c.accuracy, "unfair": c.unfairness}
    lam, theta, _ = cands[c.key]
    return TriggerFit(torch.tensor(theta), float(lam), c.threshold, opts.steps * len(lams),
                      oracle.queries_used - used_before, tune, c.summary, c.selection)
