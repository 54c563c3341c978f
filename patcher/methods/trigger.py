"""Fairness Reprogramming's declaration: the trigger method's options and presets (torch-free).

The fit itself (gradient and zeroth-order training, selection, the patch) is in `reprogram`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patcher.methods.contract import BenchDefaults, BenchFlag, FitRequest, FitResult, Method

TriggerForm = Literal["auto", "tabular", "border", "frame", "patch", "color"]


class TriggerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    lams: list[float] = Field([1.0, 2.0, 5.0, 10.0], min_length=1, description="gradient access with lam unset: "
                              "the fairness weights tried, one trigger each")
    lam_zo: float | None = Field(None, ge=0, description="zeroth-order access with lam unset: the fairness weight "
                                 "(unset: 3 tabular, 10 images)")
    steps: int = Field(600, ge=1, description="gradient steps per lambda")
    batch_size: int = Field(512, ge=8, description="gradient access: rows per step")
    lr: float = Field(0.02, gt=0, description="gradient access: the trigger's learning rate (Adam)")
    adv_lr: float = Field(1e-2, gt=0, description="fairness adversary: the discriminator's learning rate")
    q: int = Field(2, ge=1, description="zeroth order: antithetic direction pairs per step")
    zo_restarts: int = Field(0, ge=0, description="zeroth order, forms with a random start (frame): starts tried, "
                                                  "the best on one training batch kept")
    zo_restart_rows: int = Field(512, ge=8, description="zeroth order: rows of the batch that scores the starts")
    zo_unbiased_gap: bool = Field(False, description="zeroth order, gap: subtract the small-batch variance bias "
                                  "of the squared rate spread (it rewards scores uniform within a cell)")
    zo_reweight: bool | None = Field(None, description="zeroth order: weigh each stratified batch back to the "
                                     "training rows' (group, label) shares in both losses, so they estimate the "
                                     "population's accuracy and selection rates (off: every cell counts the same; "
                                     "`balance` turns it off; unset: on for tabular triggers, off for images)")
    zo_matched: float | None = Field(None, ge=0, description="zeroth order, gap: penalise the gap of soft decisions "
                                     "sigmoid((margin - cut) / (T * std(margin))) at the batch's cut that accepts "
                                     "the label rate, T this value, instead of the gap of P(class 1), which a "
                                     "trigger can shrink by pushing every score the same way (0: P(class 1); "
                                     "unset: 0.25 tabular, 0 images)")
    zo_fairness_tolerance: float | None = Field(None, ge=0, description="zeroth order: `fairness_tolerance` for "
                                                "choosing the candidate and threshold (unset: 0.03 tabular, "
                                                "`fairness_tolerance` images)")
    zo_max_accuracy_drop: float | None = Field(None, ge=0, description="zeroth order: `max_accuracy_drop` for "
                                               "choosing the candidate and threshold (unset: 0.025 tabular, "
                                               "`max_accuracy_drop` images)")
    zo_surrogate: bool | None = Field(None, description="zeroth order, tabular: distil the model from queries into "
                                      "a small surrogate, train one trigger per `zo_lams` on it with gradients, and "
                                      "choose among them and the threshold on real scores (off: randomized gradient "
                                      "estimates on the model itself; unset: on for tabular triggers)")
    zo_lams: list[float] = Field([5.0, 10.0], min_length=1, description="zeroth order with `zo_surrogate`: the "
                                 "fairness weights trained on the surrogate, each scored on the model")
    zo_subspace: int = Field(0, ge=0, description="zeroth order: search k fixed random directions around the start "
                             "instead of every trigger parameter (0: all; the estimate's variance grows like k / q)")
    zo_impute: float = Field(0.0, ge=0, le=1, description="zeroth order, tabular: the search starts with each "
                             "trigger column blended by this share toward its tuning-row mean (1: replaced by it, "
                             "so the group-correlated columns no longer show the group; 0: the model itself; a binary "
                             "mask replaces at >= 0.5); the model stays a candidate")
    select: Literal["fairest", "worst_cell"] | None = Field(
        None, description="binary with threshold: choose the trigger (lambda or evaluated candidate) and threshold "
        "on the selection rows as the fairest within the accuracy cap (default), or as the best worst (group, "
        "label) cell accuracy with unfairness at most unfairness_ratio x the model's there (none there: the least "
        "unfair point, reported as selection.target_met false)")
    unfairness_ratio: float | None = Field(None, gt=0, description="worst_cell: the unfairness target as a share "
                                                                   "of the model's on the selection rows (0.5)")
    mu: float = Field(0.05, gt=0, description="zeroth order: smoothing radius")
    zo_lr: float | None = Field(None, gt=0, description="zeroth order: step size (unset: 0.1 tabular, 0.05 images)")
    zo_batch: int | None = Field(None, ge=8, description="zeroth order: rows per step, shared by all its probes "
                                 "(unset: 64 tabular, 128 images)")
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
    border_width: int = Field(2, ge=1, description="border and frame triggers: width in pixels")
    border_block: int = Field(4, ge=1, description="border cells share one value per block x block pixels")
    init_scale: float = Field(1.0, ge=0, description="frame: std of the random start (logits of the pixels)")
    patch_size: int = Field(4, ge=1, description="patch trigger: side of the corner patch in pixels")

    @model_validator(mode="after")
    def _folds(self) -> TriggerOptions:
        if self.select_folds == 1:
            raise ValueError("select_folds: 0 (off) or at least 2 folds")
        return self

    def zo_search(self, tabular: bool) -> dict[str, Any]:
        """The zeroth-order fields of `ZO_SEARCH`: the options' values, or where unset the trigger family's (a
        family's None: the general option, e.g. `fairness_tolerance` for `zo_fairness_tolerance`)."""
        family = ZO_SEARCH["tabular" if tabular else "image"]
        out = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in family.items()}
        if out["zo_surrogate"]:  # its selection rows are 4x as many: a tighter cap, chosen for it
            out.update({k: v if getattr(self, k) is None else getattr(self, k) for k, v in SURROGATE_SELECTION.items()})
        for k in ("fairness_tolerance", "max_accuracy_drop"):
            if out[f"zo_{k}"] is None:
                out[f"zo_{k}"] = getattr(self, k)
        return out

    def selection(self) -> tuple[str, float]:
        """(rule, unfairness ratio) that choose the trigger and threshold."""
        return self.select or "fairest", self.unfairness_ratio or 0.5


# Zeroth-order settings where the options leave them unset, per trigger family (docs/triggers_zo_dev.md, chosen on
# held-out tune rows of Adult at 10,000 and 50,000 queries). Tabular: batches of 64 rows at step 0.1 (at 10,000
# queries 128-row batches made 14 steps); each stratified batch weighed back to the population (unweighted, a batch
# with a quarter of its rows in each (group, label) cell turns the dp gap into an eo-like gap and the utility into a
# balanced one); the gap of soft decisions at the cut that accepts the label rate, at lam 3 (the gap of P(class 1)
# falls when every score moves down, which the re-tuned threshold undoes); the candidate and threshold chosen as
# the most accurate point with unfairness at most 0.03 on the evaluation rows (else the least unfair) within 2.5
# points of the model there. Images: as before.
ZO_SEARCH: dict[str, dict[str, Any]] = {
    "tabular": {"zo_surrogate": True, "zo_batch": 64, "zo_lr": 0.1, "lam_zo": 3.0, "zo_reweight": True,
                "zo_matched": 0.25, "zo_fairness_tolerance": 0.03, "zo_max_accuracy_drop": 0.025},
    "image": {"zo_surrogate": False, "zo_batch": 128, "zo_lr": 0.05, "lam_zo": 10.0, "zo_reweight": False,
              "zo_matched": 0.0, "zo_fairness_tolerance": None, "zo_max_accuracy_drop": None}}
# Tabular with `zo_surrogate` (the default): the distilled surrogate's triggers (lam 5 and 10) are chosen on 2,500
# rows at 10,000 queries (625 for the estimates above): the most accurate point with dp at most 0.03 there within
# 2 points of the model (docs/triggers_zo_dev.md, third round); zo_batch/zo_lr/lam_zo/zo_reweight/zo_matched and
# zo_impute belong to the estimate search and do not apply to it.
SURROGATE_SELECTION: dict[str, Any] = {"zo_fairness_tolerance": 0.03, "zo_max_accuracy_drop": 0.02}


# Colored digits: the tune split rewards the color shortcut (it agrees with the label 90% of the time), so the
# utility loss and the selection accuracy weigh the four (color, label) cells equally (`balance`) and the accuracy
# cap is loose (a fair trigger gives up the shortcut's accuracy). The trigger is a global color mix (`color`: 12
# parameters, the identity at the start): the color is a tint of the whole image, and a mix that sends both hues
# to one removes it. Gradient access picks lambda and threshold on the out-of-fold scores of 2 folds of the tune
# split (`select_folds`: every tune row selects, then the chosen lambda is retrained on all of them). Zeroth
# order: antithetic estimates (q = 2) on stratified batches of 64 rows with the small-batch bias of the gap
# removed, the evaluated mix and threshold chosen on 30% of the tune rows held out of training (fitted rows look
# fair long before unseen ones do). Both access kinds choose the trigger (lambda, or evaluated candidate) and
# threshold with the best worst-cell accuracy on their selection rows among those that halve the model's eo there.
COLORED_DIGITS: dict[str, Any] = {
    "trigger": "color", "balance": True, "holdout": 0.3, "max_accuracy_drop": 0.1, "fairness_tolerance": 0.02,
    "lams": [2.0, 5.0, 10.0, 20.0], "steps": 400, "batch_size": 256, "lr": 0.05, "lam_zo": 20.0, "border_block": 1,
    "q": 2, "zo_batch": 64, "zo_restarts": 32, "zo_restart_rows": 128, "zo_unbiased_gap": True, "zo_subspace": 16,
    "select": "worst_cell", "zo_lr": 0.1, "mu": 0.3, "eval_size": 1000, "select_folds": 2}
# The same task with a frame trigger: the best of 32 random frames on one training batch, then q = 4 on batches of
# 32 rows in 16 random directions around it (docs/triggers.md, docs/triggers_zo_dev.md).
COLORED_DIGITS_FRAME: dict[str, Any] = {**COLORED_DIGITS, "trigger": "frame", "q": 4, "zo_batch": 32, "zo_lr": 0.2}


def fit(access: Any, data: Any, request: FitRequest, opts: TriggerOptions) -> FitResult:
    from patcher.methods.reprogram import fit_trigger  # torch

    return fit_trigger(access, data, request, opts)


def dataset_options(dataset: str, trigger: str | None = None) -> dict[str, Any]:
    """Per-task bench defaults: colored digits runs the `colored-digits` preset, or with another trigger form
    asked for (`trigger`), `colored-digits-frame` (the frame's zeroth-order search settings)."""
    if dataset != "colored-digits":
        return {}
    return dict(COLORED_DIGITS if trigger in (None, "color") else COLORED_DIGITS_FRAME)


def _bench_options(options: dict[str, Any], flags: dict[str, Any], data: Any) -> dict[str, Any]:
    return {**dataset_options(data.name, options.get("trigger")), **{k: v for k, v in options.items() if v is not None}}


def _bench_extras(run: Any) -> dict[str, Any]:
    """`--transfer-seed S` also scores the trigger on the reference model trained with seed S (the paper's
    transfer setting)."""
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import load_task, score

    r = run.report
    out = {"access": run.access, "lam": r.lam, "query_budget": run.budget, "group_at_inference": False,
           "threshold": r.threshold, "trigger": r.trigger, "steps": r.steps, "candidates": r.candidates,
           "selection": r.selection, "tune_before": r.tune_before, "tune_after": r.tune_after}
    seed = run.flags["transfer_seed"]
    if seed is not None:
        _, other = load_task(run.data.name, run.data.sensitive, seed)
        test = run.data.test
        moved = score(run.patch, OnnxOracle(other.onnx_bytes, cache=False).log_probs, test.X, test.y, test.groups,
                      seed=run.seed, privileged=run.privileged, request_id=f"evaluation-{run.seed}")
        out["transfer"] = {"seed": seed, "model_sha256": other.sha256, "before": moved.before, "after": moved.after}
    return out


SWEEP_LAMS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
SWEEP_KEYS = ("accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")


def _sweep(flags: dict[str, Any], common: dict[str, Any], options: dict[str, Any]) -> dict[str, Any] | None:
    """--sweep-lam: one trigger per lambda (each with its re-tuned threshold), test-split accuracy and fairness."""
    if not flags["sweep_lam"]:
        return None
    from patcher.pipeline import bench

    runs = [bench("trigger", **common, access=flags["access"], **{**options, "lam": lam}) for lam in SWEEP_LAMS]
    curve = [{"lam": lam, "threshold": r["threshold"], "queries_used": r["queries_used"],
              "fit_seconds": r["fit_seconds"], **{k: r["after"][k] for k in SWEEP_KEYS}}
             for lam, r in zip(SWEEP_LAMS, runs, strict=True)]
    return {"method": "trigger", "mode": "sweep-lam", "dataset": common["dataset"], "sensitive": runs[0]["sensitive"],
            "criterion": common["criterion"], "access": flags["access"], "seed": common["seed"],
            "query_budget": common["queries"], "before": runs[0]["before"], "curve": curve}


def _print_result(result: dict[str, Any]) -> bool:
    """The lambda curve in sweep mode (False otherwise: the common before/after table)."""
    if result.get("mode") != "sweep-lam":
        return False
    from rich.console import Console
    from rich.table import Table

    b = result["before"]
    table = Table(title=f"trigger lambda sweep: {result['dataset']} ({result['sensitive']}), criterion "
                        f"{result['criterion']}, {result['access']} (test split; before: accuracy "
                        f"{b['accuracy']:.4f}, dp {b['dp_diff']:.4f}, eo {b['eo_diff']:.4f})")
    cols = ("lam", *SWEEP_KEYS, "threshold", "queries_used")
    for col in cols:
        table.add_column(col, justify="right")
    for p in result["curve"]:
        table.add_row(*(f"{p[c]:.4g}" if isinstance(p[c], float) else str(p[c]) for c in cols))
    Console().print(table)
    return True


BENCH = BenchDefaults(
    datasets=("adult", "compas", "german", "colored-digits"), queries=50_000, request_id="evaluation",
    artifact_name="{}", groups=False, prepare=_bench_options, extras=_bench_extras, instead=_sweep,
    print_result=_print_result, flags=(
        BenchFlag("--access", {"choices": ("gradient", "zeroth_order"), "default": "gradient",
                               "help": "gradient: through the model artifact; zeroth_order: scores only, "
                                       "--queries rows"}),
        BenchFlag("--sweep-lam", {"action": "store_true", "help": "print the accuracy-fairness curve over lambda"}),
        BenchFlag("--transfer-seed", {"type": int, "default": None,
                                      "help": "also score the trigger on the reference model trained with this "
                                              "seed"})))

METHOD = Method(
    name="trigger",
    summary=("Fairness Reprogramming (Zhang et al. 2022): learn an input trigger, through the model's gradients or "
             "from scores only (zeroth order), that makes the frozen model fairer"),
    access=("zeroth_order", "gradient"), options=TriggerOptions, fit=fit, group_at_inference="none",
    presets={"colored-digits": COLORED_DIGITS, "colored-digits-frame": COLORED_DIGITS_FRAME}, bench=BENCH)
