"""Fairness Reprogramming: learn an input trigger that makes a frozen model fairer (ALGORITHMS.md section 3).

The model is never changed: the patch is an input transform x~ = m(x; theta) that the gateway applies
before the upstream call (tabular: x * mask + delta; images: an added border, a replaced frame, a corner
patch or a global color mix; see reprogram_triggers), optionally followed by a re-tuned decision
threshold (binary tasks). Two ways to learn it:

- gradient access (`access` is a ModelArtifact): backpropagate through the model (ONNX -> torch via
  onnx2torch); the alternating min-max with a discriminator and the projected gradient, or a direct
  rate-gap penalty (reprogram_gradient);
- zeroth-order access (`access` is an Oracle, or access_kind="zeroth_order"): scores only,
  randomized antithetic gradient estimates on a low-dimensional trigger, every row counted against
  the budget, the best trigger seen kept (reprogram_zo); `zo_trigger` gives it its own form.

lam trades accuracy for fairness. With `lam` unset, gradient access trains one trigger per value of
`lams` and keeps the one whose operating point (on the tuning rows) `select` prefers; zeroth-order
access trains one trigger at `lam_zo` (its budget is too small to split).

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
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from patcher.access import ModelArtifact
from patcher.methods.reprogram_fairness import (
    Criterion,
    cell_weights,
    operating_point,
    worst_cell_point,
)
from patcher.methods.reprogram_gradient import model_logits, train_trigger
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
from patcher.metrics import criterion_gap
from patcher.onnx_graphs import GraphBuilder, float_tensor
from patcher.oracle import Oracle
from patcher.patch import Patch
from patcher.scores import log_softmax
from patcher.tuning import TuningData, stratified_split

ACCESS = frozenset({"gradient", "zeroth_order"})
TriggerForm = Literal["auto", "tabular", "border", "frame", "patch", "color"]


class ReprogramOptions(BaseModel):
    access_kind: Literal["gradient", "zeroth_order"] | None = Field(
        None, description="default: gradient for a model artifact, zeroth_order for an oracle (the job worker "
                          "passes the job's access here)")
    trigger: TriggerForm = Field("auto", description="auto: tabular for [N, d] inputs, border for images; frame: "
                                 "a border that replaces the pixels; color: a global channel mix (C * C + C "
                                 "parameters) at every pixel")
    zo_trigger: TriggerForm | None = Field(None, description="zeroth-order access: its own trigger form (unset: "
                                           "`trigger`), e.g. a few-parameter color mix where the gradient path "
                                           "trains a frame")
    mask: Literal["scale", "binary"] = Field("scale", description="tabular mask: real gain, or 0/1 (straight-through)")
    columns: list[int] | None = Field(None, description="tabular columns the trigger may touch (default: "
                                      "all with gradients, the zo_columns most group-correlated with queries)")
    zo_columns: int = Field(6, ge=1, description="tabular columns a zeroth-order trigger touches")
    fairness: Literal["gap", "adversary"] = Field(
        "gap", description="gap: penalise the groups' rate spread directly; adversary: discriminator min-max")
    lam: float | None = Field(None, ge=0, description="fairness weight; unset: sweep `lams` (gradient)")
    lams: list[float] = Field([1.0, 2.0, 5.0, 10.0], min_length=1)
    lam_zo: float = Field(10.0, ge=0)
    steps: int = Field(600, ge=1, description="gradient steps per lambda")
    batch_size: int = Field(512, ge=8)
    lr: float = Field(0.02, gt=0)
    adv_lr: float = Field(1e-2, gt=0)
    q: int = Field(2, ge=1, description="zeroth order: antithetic direction pairs per step")
    zo_restarts: int = Field(0, ge=0, description="zeroth order, forms with a random start (frame): starts tried, "
                                                  "the best on one training batch kept")
    zo_restart_rows: int = Field(512, ge=8, description="zeroth order: rows of the batch that scores the starts")
    zo_unbiased_gap: bool = Field(False, description="zeroth order, gap: subtract the small-batch variance bias "
                                  "of the squared rate spread (it rewards scores uniform within a cell)")
    zo_subspace: int = Field(0, ge=0, description="zeroth order: search k fixed random directions around the start "
                             "instead of every trigger parameter (0: all; the estimate's variance grows like k / q)")
    select: Literal["fairest", "worst_cell"] | None = Field(
        None, description="binary with threshold: choose the trigger (lambda or evaluated candidate) and threshold "
        "on the selection rows as the fairest within the accuracy cap (default), or as the best worst (group, "
        "label) cell accuracy with unfairness at most unfairness_ratio x the model's there (none there: the least "
        "unfair point, reported as selection.target_met false)")
    unfairness_ratio: float | None = Field(None, gt=0, description="worst_cell: the unfairness target as a share "
                                                                   "of the model's on the selection rows (0.5)")
    zo_select: Literal["fairest", "worst_cell"] | None = Field(
        None, description="older name of select, for zeroth-order access only (kept so saved job options work)")
    zo_unfairness_ratio: float | None = Field(None, gt=0, description="older name of unfairness_ratio")
    mu: float = Field(0.05, gt=0, description="zeroth order: smoothing radius")
    zo_lr: float = Field(0.05, gt=0)
    zo_batch: int = Field(128, ge=8, description="zeroth order: rows per step (shared by all its probes)")
    eval_size: int = Field(3000, ge=50, description="zeroth order: tuning rows that score candidate triggers")
    evals: int = Field(3, ge=1, description="zeroth order: evaluations during the run (plus the start)")
    balance: bool = Field(False, description="every (group, label) cell weighs the same in the utility loss and "
                                             "in the selection accuracy")
    holdout: float = Field(0.0, ge=0, le=0.8, description="share of the tuning rows (stratified by group and label) "
                           "kept out of trigger training; lambda, the evaluated trigger and the threshold are "
                           "chosen on them (0: on the training rows)")
    select_folds: int = Field(0, ge=0, description="gradient access: choose lambda and threshold by cross-fitting "
                              "instead of `holdout`: the tuning rows in k folds (stratified by group and label), one "
                              "trigger per (lambda, fold) trained on the other folds scores that fold, the rule runs "
                              "on every row's out-of-fold score, then the chosen lambda is trained on all rows "
                              "(0: off; 1 is not a split)")
    threshold: bool = Field(True, description="re-tune the decision threshold after the trigger (binary)")
    fairness_tolerance: float = Field(0.02, ge=0, description="unfairness on tuning rows that is good enough")
    max_accuracy_drop: float | None = Field(0.015, ge=0, description="accuracy the patch may cost on tuning rows")
    border_width: int = Field(2, ge=1)
    border_block: int = Field(4, ge=1, description="border cells share one value per block x block pixels")
    init_scale: float = Field(1.0, ge=0, description="frame: std of the random start (logits of the pixels)")
    patch_size: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_name_per_option(self) -> ReprogramOptions:
        for new, old in (("select", "zo_select"), ("unfairness_ratio", "zo_unfairness_ratio")):
            a, b = getattr(self, new), getattr(self, old)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{old} is the older name of {new}; give one of them (got {a!r} and {b!r})")
        if self.select_folds == 1:
            raise ValueError("select_folds: 0 (off) or at least 2 folds")
        return self

    def selection(self, access: str) -> tuple[str, float]:
        """(rule, unfairness ratio) for this access kind; zo_select (the older name) speaks for zeroth order only,
        as it always did."""
        rule = self.select or (self.zo_select if access == "zeroth_order" else None) or "fairest"
        ratio = self.unfairness_ratio or self.zo_unfairness_ratio or 0.5
        return rule, ratio


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


def make_trigger(X: np.ndarray, groups: np.ndarray, opts: ReprogramOptions, access: str) -> Trigger:
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
        return FrameTrigger(X.shape[1:], opts.border_width, block, opts.init_scale, opts.seed)
    return PatchTrigger(X.shape[1:], opts.patch_size)


def threshold_graph(n_classes: int, threshold: float) -> bytes:
    """patched = log_probs - [0, threshold]: argmax is the decision margin > threshold."""
    g = GraphBuilder()
    g.op("Add", ["log_probs", g.const(np.array([0.0, -threshold], np.float32), "shift")], "patched_log_probs")
    m = g.model([float_tensor("log_probs", ["N", n_classes])], [float_tensor("patched_log_probs", ["N", n_classes])],
                "trigger_threshold", doc=f"decision threshold {threshold:.6g} on log p1 - log p0")
    return m.SerializeToString()


def _choose(logps: list[tuple[int, np.ndarray]], base: np.ndarray, y: np.ndarray, groups: np.ndarray, G: int,
            criterion: Criterion, opts: ReprogramOptions) -> tuple[int, float, float, float, float, list[dict]]:
    """(candidate index, threshold, accuracy, unfairness, base unfairness, summaries) on tuning rows
    (accuracy cell-balanced with `opts.balance`)."""
    w = cell_weights(y, groups) if opts.balance else np.ones(len(y))
    base_pred = base.argmax(1)
    base_acc = float(np.average(base_pred == y, weights=w))
    base_unfair = criterion_gap(base_pred, y, groups, G, criterion)
    C = base.shape[1]
    if C == 2 and opts.threshold:
        key, thr, acc, unf, summary = operating_point(
            [(k, lp[:, 1] - lp[:, 0]) for k, lp in logps], y, groups, G, criterion, base_acc,
            opts.fairness_tolerance, opts.max_accuracy_drop, w if opts.balance else None)
        return int(key), thr, acc, unf, base_unfair, summary
    best, best_key, summary = None, None, []
    for k, lp in logps:
        pred = lp.argmax(1)
        acc, unf = float(np.average(pred == y, weights=w)), criterion_gap(pred, y, groups, G, criterion)
        summary.append({"key": k, "accuracy": acc, "unfairness": unf, "threshold": 0.0})
        within = opts.max_accuracy_drop is None or acc >= base_acc - opts.max_accuracy_drop
        rank = (not within, max(unf, opts.fairness_tolerance), -acc)
        if best_key is None or rank < best_key:
            best_key, best = rank, (k, acc, unf)
    return best[0], 0.0, best[1], best[2], base_unfair, summary


def _select(logps: list[tuple[int, np.ndarray]], base: np.ndarray, y: np.ndarray, groups: np.ndarray, G: int,
            criterion: Criterion, opts: ReprogramOptions, access: str,
            ) -> tuple[int, float, float, float, float, list[dict], dict]:
    """`_choose`'s answer plus what chose it, by the options' rule; y and groups are the selection rows (the
    held-out tuning rows with `holdout`), never the test split."""
    rule, ratio = opts.selection(access)
    if rule == "worst_cell" and opts.threshold and base.shape[1] == 2:
        base_unfair = criterion_gap(base.argmax(1), y, groups, G, criterion)
        target = ratio * base_unfair
        k, thr, acc, unf, summary = worst_cell_point(
            [(i, lp[:, 1] - lp[:, 0]) for i, lp in logps], y, groups, G, criterion, target,
            cell_weights(y, groups) if opts.balance else None)
        # target not met: worst_cell_point fell back on the least unfair point; say so
        return int(k), thr, acc, unf, base_unfair, summary, {
            "rule": "worst_cell", "unfairness_target": target, "target_met": bool(unf <= target)}
    k, thr, acc, unf, base_unfair, summary = _choose(logps, base, y, groups, G, criterion, opts)
    info: dict = {"rule": "fairest"}
    if rule == "worst_cell":
        info["note"] = "worst_cell needs a binary task with a re-tuned threshold: chose the fairest"
    return k, thr, acc, unf, base_unfair, summary, info


def fit(access: Oracle | ModelArtifact, data: TuningData, criterion: Criterion = "dp", budget: int | None = None, *,
        progress: Callable[[float, dict], None] | None = None, **options) -> tuple[Patch, FitReport]:
    """Learn a fairness trigger on the tuning data (see the module docstring)."""
    opts = ReprogramOptions(**options)
    report_progress = progress or (lambda _f, _i: None)
    if criterion not in ("dp", "eo", "eopp"):
        raise ValueError(f"unknown criterion {criterion!r}; choose dp, eo or eopp")
    kind = opts.access_kind or ("gradient" if isinstance(access, ModelArtifact) else "zeroth_order")
    if kind == "gradient" and not isinstance(access, ModelArtifact):
        raise ValueError("access 'gradient' needs the model's ONNX artifact; an endpoint alone gives scores "
                         "only: use access 'zeroth_order'")
    started = time.perf_counter()
    X = np.asarray(data.X, np.float32)
    y, groups, G = np.asarray(data.y, np.int64), np.asarray(data.groups, np.int64), data.n_groups
    trigger = make_trigger(X, groups, opts, kind)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads cost more than they save on a shared CPU
    try:
        if kind == "gradient":
            theta, lam, thr, steps, queries, tune, summary, selection = _fit_gradient(
                access, trigger, X, y, groups, G, criterion, opts, report_progress)
        else:
            oracle = access.oracle(budget) if isinstance(access, ModelArtifact) else access
            theta, lam, thr, steps, queries, tune, summary, selection = _fit_zo(
                oracle, trigger, X, y, groups, G, criterion, budget, opts, report_progress)
    finally:
        torch.set_num_threads(threads)
    report_progress(0.97, {"stage": "exporting the patch", "lam": lam, "threshold": thr})
    C = tune["n_classes"]
    report = FitReport(
        access=kind, criterion=criterion, trigger=trigger.describe(theta), lam=lam, threshold=thr,
        queries_used=queries, steps=steps,
        tune_before={"accuracy": tune["base_acc"], criterion: tune["base_unfair"]},
        tune_after={"accuracy": tune["acc"], criterion: tune["unfair"]}, candidates=summary,
        selection=selection, fit_seconds=time.perf_counter() - started)
    patch = Patch.build(
        method="trigger", n_classes=C, groups=list(data.group_names), group_at_inference=False,
        input_transform=trigger.to_onnx(theta),
        output_transform=threshold_graph(C, thr) if C == 2 and thr != 0.0 else None,
        params={"access": kind, "criterion": criterion, "lam": lam, "threshold": thr,
                "trigger": trigger.describe(theta)},
        report=report.model_dump(exclude={"candidates", "fit_seconds"}))
    return patch, report


def _accuracy(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, opts: ReprogramOptions) -> float:
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


def _train(model, trigger: Trigger, X, y, groups, G, criterion, lam: float, C: int, opts: ReprogramOptions,
           report_progress, unit: int, units: int) -> torch.Tensor:
    """One trigger trained with gradients on these rows; progress reported as training unit `unit` of `units`."""
    def tick(step: int) -> None:
        if step % 50 == 0:
            report_progress(0.05 + 0.9 * (unit + step / opts.steps) / units, {"stage": "training", "lam": lam,
                                                                              "step": step})
    return train_trigger(model, trigger, X, y, groups, G, criterion, lam, steps=opts.steps,
                         batch_size=min(opts.batch_size, len(X)), lr=opts.lr, adv_lr=opts.adv_lr,
                         fairness=opts.fairness, seed=opts.seed, n_classes=C, tick=tick,
                         weights=cell_weights(y, groups) if opts.balance else None)


def _fit_gradient(artifact: ModelArtifact, trigger: Trigger, X, y, groups, G, criterion, opts, report_progress):
    model = artifact.torch_module()
    for p in model.parameters():
        p.requires_grad_(False)
    if opts.select_folds >= 2:
        return _fit_gradient_crossfit(model, trigger, X, y, groups, G, criterion, opts, report_progress)
    everything = np.arange(len(y))  # holdout 0: lambda and threshold are chosen on the rows the trigger fit
    sel, fit_rows = stratified_split(y, groups, opts.holdout, [opts.seed, 7]) if opts.holdout > 0 else (everything,) * 2
    Xs, ys, gs = X[sel], y[sel], groups[sel]
    X, y, groups = X[fit_rows], y[fit_rows], groups[fit_rows]
    base = log_softmax(model_logits(model, Xs))
    C = base.shape[1]
    lams = [opts.lam] if opts.lam is not None else list(opts.lams)
    thetas, logps = [], []
    for i, lam in enumerate(lams):
        theta = _train(model, trigger, X, y, groups, G, criterion, lam, C, opts, report_progress, i, len(lams))
        thetas.append(theta)
        logps.append((i, log_softmax(model_logits(model, Xs, trigger, theta))))
    k, thr, acc, unf, base_unfair, summary, selection = _select(logps, base, ys, gs, G, criterion, opts, "gradient")
    for s in summary:
        s["lam"] = lams[s.pop("key")]
    tune = {"n_classes": C, "base_acc": _accuracy(base, ys, gs, opts), "base_unfair": base_unfair,
            "acc": acc, "unfair": unf}
    return thetas[k], float(lams[k]), thr, opts.steps * len(lams), 0, tune, summary, selection


def _fit_gradient_crossfit(model, trigger: Trigger, X, y, groups, G, criterion, opts, report_progress):
    """Cross-fitted selection: every tuning row is scored by triggers that did not train on it, so the rule
    (lambda and threshold) sees all the rows instead of a 30% holdout (a holdout leaves ~40 rows per minority
    cell, and the point the rule picks is where their noise flatters it most). The final trigger is the chosen
    lambda trained on all rows: the fold triggers each saw (k-1)/k of the rows, and an input transform cannot
    average several of them without k model calls per request."""
    K = opts.select_folds
    folds = crossfit_folds(y, groups, K, opts.seed)
    base = log_softmax(model_logits(model, X))
    C = base.shape[1]
    lams = [opts.lam] if opts.lam is not None else list(opts.lams)
    units = len(lams) * K + 1

    def train(rows: np.ndarray, lam: float, unit: int) -> torch.Tensor:
        return _train(model, trigger, X[rows], y[rows], groups[rows], G, criterion, lam, C, opts, report_progress,
                      unit, units)

    logps = []
    for i, lam in enumerate(lams):
        oof = np.empty_like(base)
        for f in range(K):
            theta = train(np.flatnonzero(folds != f), lam, i * K + f)
            held = np.flatnonzero(folds == f)
            oof[held] = log_softmax(model_logits(model, X[held], trigger, theta))
        logps.append((i, oof))
    k, thr, acc, unf, base_unfair, summary, selection = _select(logps, base, y, groups, G, criterion, opts, "gradient")
    selection.update(folds=K, selection_rows=len(y))
    for s in summary:
        s["lam"] = lams[s.pop("key")]
    theta = train(np.arange(len(y)), lams[k], units - 1)
    tune = {"n_classes": C, "base_acc": _accuracy(base, y, groups, opts), "base_unfair": base_unfair,
            "acc": acc, "unfair": unf}  # out-of-fold figures: the final trigger's own tuning rows would flatter it
    return theta, float(lams[k]), thr, opts.steps * units, 0, tune, summary, selection


def _fit_zo(oracle: Oracle, trigger: Trigger, X, y, groups, G, criterion, budget, opts, report_progress):
    remaining = getattr(oracle, "remaining", None)
    limits = [b for b in (budget, remaining) if b is not None]
    limit = min(limits) if limits else 20_000
    everything = np.arange(len(y))  # holdout 0: lambda and threshold are chosen on the rows the trigger fit
    sel, fit_rows = stratified_split(y, groups, opts.holdout, [opts.seed, 7]) if opts.holdout > 0 else (everything,) * 2
    eval_size = min(opts.eval_size, len(sel), max(limit // (4 * (opts.evals + 1)), 50))
    C_guess = int(y.max()) + 1
    trainer = ZOTrainer(oracle, trigger, X, y, groups, G, criterion, opts.lam_zo if opts.lam is None else opts.lam,
                        fairness=opts.fairness, q=opts.q, mu=opts.mu, lr=opts.zo_lr,
                        batch_size=min(opts.zo_batch, len(X)), eval_size=eval_size, evals=opts.evals,
                        seed=opts.seed, n_classes=max(C_guess, 2),
                        holdout=(fit_rows, sel) if opts.holdout > 0 else None, restarts=opts.zo_restarts,
                        restart_rows=opts.zo_restart_rows, unbiased_gap=opts.zo_unbiased_gap,
                        subspace=opts.zo_subspace)
    evaluations = 2 if trigger.identity_start else 3  # a start that is not the model: the model scored too
    need = eval_size * evaluations + trainer.step_cost() + trainer.restarts * trainer.restart_rows()
    if limit < need:
        raise ValueError(f"a budget of {limit} queries is too small for a zeroth-order trigger: it needs at least "
                         f"{need} ({evaluations} evaluations of {eval_size} rows, the starts and one step)")
    used_before = oracle.queries_used
    report_progress(0.02, {"stage": "training", "queries_used": 0})
    result = trainer.run(limit, lambda f, info: report_progress(0.02 + 0.9 * f, {"stage": "training", **info}))
    rows = result.eval_rows
    logps = [(i, lp) for i, (_, _, lp) in enumerate(result.candidates)]
    k, thr, acc, unf, base_unfair, summary, selection = _select(logps, result.base_log_probs, y[rows], groups[rows],
                                                                G, criterion, opts, "zeroth_order")
    for s, hist in zip(summary, result.history, strict=True):
        s.update(step=hist["step"], queries=hist["queries"])
        s.pop("key")
    base = result.base_log_probs
    tune = {"n_classes": base.shape[1], "base_acc": _accuracy(base, y[rows], groups[rows], opts),
            "base_unfair": base_unfair, "acc": acc, "unfair": unf}
    theta = torch.tensor(result.candidates[k][1])
    return theta, float(trainer.lam), thr, result.steps, oracle.queries_used - used_before, tune, summary, selection
