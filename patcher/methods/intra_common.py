"""Shared parts of the intra-processing debiasers (Savani, White, Govindarajulu, NeurIPS 2020).

The three weight-access methods (random perturbation, layer-wise optimisation, adversarial
fine-tuning) all score a candidate model with the same objective on the tuning rows:

    phi = balanced accuracy   if |bias| < epsilon - margin   else 0

maximised over the decision threshold (`threshold_search`). `bias` is one of the paper's measures,
each a gap of one per-group rate: SPD (selection rate), EOD (true-positive rate) and AOD (mean of
true- and false-positive rate). With two groups it is rate(group 0) - rate(group 1), the AIF360
sign when group 0 is the unprivileged one; with more groups it is the largest gap (max - min).

The result of every method is a weight patch: the debiased torch module, wrapped so its threshold
is baked into the logits (argmax = decision), exported to ONNX with the original input name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from patcher.methods.contract import BenchDefaults, FitRequest, FitResult, Progress
from patcher.metrics import Sweep, decision_rates, rate_gap, sweep
from patcher.tuning import TuningData

if TYPE_CHECKING:
    import torch

    from patcher.access import ModelArtifact

BiasMeasure = Literal["spd", "eod", "aod"]
OutputKind = Literal["logits", "probs"]
CRITERION_MEASURE: dict[str, BiasMeasure] = {"dp": "spd", "eo": "eod", "eopp": "eod"}


class IntraOptions(BaseModel):
    """Options every intra-processing method takes; unknown names are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    bias_measure: BiasMeasure | None = Field(None, description="spd, eod or aod (default: from the criterion, "
                                                               "dp -> spd, eo/eopp -> eod)")
    epsilon: float = Field(0.05, gt=0, lt=1, description="the bias bound of the objective")
    margin: float = Field(0.01, ge=0, lt=1, description="tune against epsilon - margin, so the bound holds on "
                                                        "unseen rows")
    bootstrap: int = Field(5, ge=0, le=1000, description="average phi over this many bootstrap resamples of "
                                                          "the tuning rows (0: phi on the rows themselves)")
    se_margin: float = Field(0.0, ge=0, le=10, description="a cut is feasible when |bias| < epsilon - max(margin, "
                                                           "se_margin * standard error of its bias estimate) (0: "
                                                           "the fixed margin only)")

    @model_validator(mode="after")
    def _margin_below_epsilon(self) -> IntraOptions:
        if self.margin >= self.epsilon:
            raise ValueError(f"margin ({self.margin}) must be below epsilon ({self.epsilon}): the threshold search "
                             "tunes against epsilon - margin; pass a smaller margin")
        return self


def resolve_measure(criterion: str, bias_measure: BiasMeasure | None) -> BiasMeasure:
    if criterion not in CRITERION_MEASURE:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERION_MEASURE)}")
    return bias_measure or CRITERION_MEASURE[criterion]


# ---------------------------------------------------------------- bias and the objective


def measure_rates(rates: dict[str, np.ndarray], measure: BiasMeasure) -> np.ndarray:
    """The per-group rate a measure compares, from patcher.metrics' decision or sweep rates."""
    return {"spd": rates["sr"], "eod": rates["tpr"], "aod": 0.5 * (rates["tpr"] + rates["fpr"])}[measure]


def bias(pred: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, measure: BiasMeasure) -> float:
    """The measure's signed gap (patcher.metrics.rate_gap) of hard or soft predictions in [0, 1]; 0 if undefined."""
    return float(np.nan_to_num(rate_gap(measure_rates(decision_rates(pred, y, groups, n_groups), measure),
                                        signed=True)))


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    pred = np.asarray(pred) > 0.5
    tpr = pred[y == 1].mean() if (y == 1).any() else 0.0
    tnr = (~pred[y == 0]).mean() if (y == 0).any() else 0.0
    return float(0.5 * (tpr + tnr))


@dataclass(frozen=True)
class Operating:
    """The best decision threshold of one candidate model on the tuning rows."""

    threshold: float  # decide positive where margin (logit1 - logit0) > threshold
    objective: float  # phi at that threshold
    balanced_accuracy: float
    accuracy: float
    bias: float  # signed, see the module docstring
    feasible: bool  # |bias| < epsilon - margin
    positive_rate: float

    def as_dict(self) -> dict[str, float | bool]:
        return {"threshold": self.threshold, "objective": self.objective, "balanced_accuracy": self.balanced_accuracy,
                "accuracy": self.accuracy, "bias": self.bias, "feasible": self.feasible,
                "positive_rate": self.positive_rate}


def _cut_curves(sw: Sweep, measure: BiasMeasure):
    """Balanced accuracy, accuracy, signed bias and the bias estimate's standard error of every cut "top k rows
    positive" (k = 0..n) of a sweep with row weights [B, n]; each output is [B, n + 1]."""
    pos, tot = sw.positive, sw.total  # weighted positives per (group, label): [B, n + 1, G, 2], [B, G, 2]
    P, N = tot[:, :, 1].sum(1)[:, None], tot[:, :, 0].sum(1)[:, None]
    tp, fp = pos[:, :, :, 1].sum(2), pos[:, :, :, 0].sum(2)
    r = sw.rates()
    rates, n_pos, n_neg = measure_rates(r, measure), tot[:, None, :, 1], tot[:, None, :, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ba = np.nan_to_num(0.5 * (tp / P + 1 - fp / N))
        acc = (tp + N - fp) / (P + N)
        if measure == "aod":
            var = 0.25 * (r["tpr"] * (1 - r["tpr"]) / n_pos + r["fpr"] * (1 - r["fpr"]) / n_neg)
        else:
            var = rates * (1 - rates) / (tot.sum(2)[:, None] if measure == "spd" else n_pos)
    gap = np.nan_to_num(rate_gap(rates, signed=True))
    return ba, acc, gap, _gap_se(rates, var)


def _gap_se(rates: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Binomial standard error of the gap of the last axis (two groups: both; more: the max and the min group)."""
    var = np.nan_to_num(var, nan=0.0)
    if rates.shape[-1] == 2:
        return np.sqrt(var.sum(-1))
    filled = np.nan_to_num(rates, nan=np.inf)
    lo = np.take_along_axis(var, np.argmin(filled, -1)[..., None], -1)[..., 0]
    hi = np.take_along_axis(var, np.argmax(np.nan_to_num(rates, nan=-np.inf), -1)[..., None], -1)[..., 0]
    return np.sqrt(lo + hi)


def bootstrap_weights(n: int, count: int, seed: int) -> np.ndarray | None:
    """`count` bootstrap resamples of n rows as per-row multiplicities [count, n] (None when count is 0)."""
    if count <= 0:
        return None
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=count).astype(np.float64)


def threshold_search(margin: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, measure: BiasMeasure,
                     bound: float, bootstrap: np.ndarray | None = None, *, epsilon: float | None = None,
                     se_margin: float = 0.0) -> Operating:
    """Maximise phi over every distinct cut of `margin` (exact, vectorised: one sort and cumulative counts).

    `bound` = epsilon - margin. Cut k makes the top k rows positive; only cuts between distinct scores are
    realisable. Among cuts of equal phi the least biased wins. The constant rules (everyone or no one
    positive) have zero bias and balanced accuracy 0.5: the floor, as in the paper.

    With `bootstrap` ([B, n] row multiplicities) the objective is phi averaged over the resamples, as
    the reference's validation objective does (5 random resamples there, 5 fixed ones here by default, so
    a search is deterministic): a cut whose bias is under the bound only by luck of the sample scores less.
    The cut must also be feasible on the rows themselves.

    With `se_margin` z > 0 a cut is feasible only when |bias| < min(bound, epsilon - z * SE), SE the binomial
    standard error of that cut's bias estimate on these rows: on few rows a gap under the bound by less than
    its own noise is not evidence that it holds on unseen rows (the trivial cuts have SE 0 and stay feasible).
    """
    margin = np.asarray(margin, np.float64)
    y = np.asarray(y, np.int64)
    groups = np.asarray(groups, np.int64)
    sw = sweep(margin, y, groups, n_groups, weights=np.ones((1, len(margin))))
    s, n = sw.ordered, len(margin)
    ba, acc, gap, se = (a[0] for a in _cut_curves(sw, measure))
    limit = np.full(n + 1, bound)
    if se_margin > 0:
        if epsilon is None:
            raise ValueError("se_margin needs epsilon")
        limit = np.minimum(limit, epsilon - se_margin * se)
    ok = np.abs(gap) < limit
    phi = np.where(ok, ba, 0.0)
    if bootstrap is not None:
        ba_b, _, gap_b, _ = _cut_curves(sweep(margin, y, groups, n_groups, weights=bootstrap), measure)
        phi = np.where(ok, np.where(np.abs(gap_b) < limit, ba_b, 0.0).mean(0), 0.0)
    realisable = np.ones(n + 1, bool)
    realisable[1:n] = s[:-1] > s[1:]
    key = np.where(realisable, phi - 1e-9 * np.abs(gap), -np.inf)
    k = int(np.argmax(key))
    return Operating(threshold=float(sw.cuts[k]), objective=float(phi[k]), balanced_accuracy=float(ba[k]),
                     accuracy=float(acc[k]), bias=float(gap[k]), feasible=bool(ok[k]), positive_rate=k / max(n, 1))


def default_operating(margin: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, measure: BiasMeasure,
                      bound: float) -> Operating:
    """The model as deployed: threshold 0 on the margin (argmax)."""
    pred = (np.asarray(margin) > 0).astype(np.float64)
    ba, b = balanced_accuracy(pred, y), bias(pred, y, groups, n_groups, measure)
    return Operating(threshold=0.0, objective=ba if abs(b) < bound else 0.0, balanced_accuracy=ba,
                     accuracy=float(np.mean(pred == y)), bias=b, feasible=abs(b) < bound,
                     positive_rate=float(pred.mean()))


# ---------------------------------------------------------------- torch helpers


class Scorer:
    """Margins (logit1 - logit0) of a torch module on fixed rows, in batches, without gradients."""

    def __init__(self, X: np.ndarray, output_kind: OutputKind = "logits", batch_size: int = 16384,
                 device: torch.device | str = "cpu") -> None:
        import torch

        self.X = torch.from_numpy(np.array(X, np.float32)).to(device)
        self.output_kind = output_kind
        self.batch_size = batch_size

    def margin(self, module: torch.nn.Module) -> np.ndarray:
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(self.X), self.batch_size):
                outs.append(logit_margin(module(self.X[i:i + self.batch_size]), self.output_kind))
        return torch.cat(outs).double().cpu().numpy()


def logit_margin(out: torch.Tensor, output_kind: OutputKind = "logits") -> torch.Tensor:
    """log p1 - log p0 from a [N, 2] output (differentiable)."""
    import torch

    if output_kind == "probs":
        out = torch.log(out.clamp_min(1e-12))
    return out[:, 1] - out[:, 0]


def load_binary_module(access: ModelArtifact, data: TuningData, output_kind: OutputKind) -> torch.nn.Module:
    """The artifact as a torch module, checked to be a binary classifier with [N, 2] outputs."""
    import torch

    from patcher.access import ModelArtifact

    if not isinstance(access, ModelArtifact):
        raise ValueError(f"intra-processing needs the model's weights (a ModelArtifact), got {type(access).__name__};"
                         " upload the model's ONNX artifact")
    if set(np.unique(data.y).tolist()) - {0, 1}:
        raise ValueError("intra-processing methods are binary: labels must be 0/1")
    module = access.torch_module()
    with torch.no_grad():
        out = module(torch.as_tensor(np.asarray(data.X[:2], np.float32)))
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError(f"the model outputs shape {list(out.shape)}; intra-processing needs [N, 2] scores")
    if output_kind == "probs" and (out.min() < 0 or out.max() > 1):
        raise ValueError("output_kind='probs' but the model's outputs are not in [0, 1]")
    return module


def freeze_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).eval()


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def thresholded_module(module: torch.nn.Module, threshold: float, output_kind: OutputKind = "logits"):
    """The module with its threshold baked in: argmax of the output = (margin > threshold)."""
    import torch

    class Thresholded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module
            self.register_buffer("shift", torch.tensor([0.0, -threshold], dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            if output_kind == "probs":
                out = torch.log(out.clamp_min(1e-12))
            return out + self.shift

    return Thresholded().eval()


def last_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The last Linear layer in execution order (fx graph order for onnx2torch modules)."""
    import torch

    graph = getattr(module, "graph", None)
    found = None
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(module.get_submodule(node.target), torch.nn.Linear):
                found = module.get_submodule(node.target)
    if found is None:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        found = linears[-1] if linears else None
    if found is None:
        raise ValueError("the model has no Linear layer: adversarial fine-tuning needs a final linear layer")
    return found


def export_weight_patch_model(access: ModelArtifact, module: torch.nn.Module, threshold: float,
                              output_kind: OutputKind, sample: np.ndarray) -> bytes:
    """ONNX bytes of the debiased module with the threshold baked in; same input name as the original."""
    import onnx
    import torch

    from patcher.access import torch_to_onnx

    input_name = onnx.load_from_string(access.onnx_bytes).graph.input[0].name
    wrapped = thresholded_module(freeze_copy(module).cpu(), threshold, output_kind)  # exported on the CPU
    return torch_to_onnx(wrapped, torch.as_tensor(np.asarray(sample[:2], np.float32)), input_name=input_name)


def onnx_margin(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """logits1 - logits0 of an ONNX model (onnxruntime), for checks and benches."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.asarray(X, np.float32)})[0]
    return out[:, 1].astype(np.float64) - out[:, 0]


# ---------------------------------------------------------------- reports and the patch


class IntraReport(BaseModel):
    method: str
    access: str = "weights"
    queries_used: int = 0
    criterion: str
    bias_measure: BiasMeasure
    epsilon: float
    margin: float
    threshold: float  # on the margin logit1 - logit0, baked into the patched model
    tune_default: dict[str, float | bool]  # the model as deployed (threshold 0) on the tuning rows
    tune_base: dict[str, float | bool]  # the unchanged model with the threshold search
    tune_after: dict[str, float | bool]  # the debiased model with its threshold
    details: dict[str, Any] = Field(default_factory=dict)
    fit_seconds: float


def build_patch(method: str, access: ModelArtifact, data: TuningData, module: torch.nn.Module, op: Operating,
                report: IntraReport, output_kind: OutputKind) -> Any:
    from patcher.patch import Patch

    onnx_bytes = export_weight_patch_model(access, module, op.threshold, output_kind, data.X)
    params = {"threshold": op.threshold, "bias_measure": report.bias_measure, "epsilon": report.epsilon,
              "margin": report.margin, "criterion": report.criterion, "base_model_sha256": access.sha256}
    return Patch.build(method=method, n_classes=2, groups=list(data.group_names), group_at_inference=False,
                       replacement_model=onnx_bytes, params=params,
                       report=report.model_dump(exclude={"details", "fit_seconds"}))


# ---------------------------------------------------------------- the shared fit skeleton


@dataclass
class FitContext:
    """Everything a method needs after the common checks: the module, its scorer, the objective's terms."""

    access: ModelArtifact
    data: TuningData
    criterion: str
    opts: Any
    measure: BiasMeasure
    bound: float  # epsilon - margin
    module: Any  # torch.nn.Module
    scorer: Scorer
    default: Operating  # the deployed model (threshold 0) on the tuning rows
    base: Operating  # the unchanged model with the threshold search
    progress: Progress
    started: float
    resamples: np.ndarray | None = None  # bootstrap multiplicities of the tuning rows, fixed for the fit
    output_kind: OutputKind = "logits"  # what the model's [N, 2] output holds
    device: Any = "cpu"  # the torch.device the module and the scorer's rows are on (patcher.device)

    def search(self, margin: np.ndarray) -> Operating:
        return threshold_search(margin, self.data.y, self.data.groups, self.data.n_groups, self.measure, self.bound,
                                self.resamples, epsilon=self.opts.epsilon, se_margin=self.opts.se_margin)

    def evaluate(self, module: Any) -> Operating:
        return self.search(self.scorer.margin(module))


def prepare(access: ModelArtifact, data: TuningData, request: FitRequest, opts: IntraOptions) -> FitContext:
    import time

    started = time.perf_counter()
    criterion, seed = request.criterion, request.seed
    output_kind: OutputKind = "probs" if request.output_kind == "probabilities" else "logits"
    measure = resolve_measure(criterion, opts.bias_measure)
    if data.n_groups < 2 or len(np.unique(data.groups)) < 2:
        raise ValueError("the tuning rows hold fewer than two groups: no bias to measure")
    from patcher.device import torch_device

    device = torch_device(request.device)
    module = load_binary_module(access, data, output_kind).to(device)
    scorer = Scorer(data.X, output_kind, device=device)
    bound = opts.epsilon - opts.margin
    margin = scorer.margin(module)
    y, g, G = np.asarray(data.y), np.asarray(data.groups), data.n_groups
    resamples = bootstrap_weights(len(y), opts.bootstrap, seed)
    return FitContext(access, data, criterion, opts, measure, bound, module, scorer,
                      default_operating(margin, y, g, G, measure, bound),
                      threshold_search(margin, y, g, G, measure, bound, resamples, epsilon=opts.epsilon,
                                       se_margin=opts.se_margin), request.report,
                      started, resamples, output_kind, device)


def finish(method: str, ctx: FitContext, module: Any, op: Operating, details: dict[str, Any]) -> FitResult:
    import time

    ctx.progress(0.97, {"stage": "exporting the weight patch", "threshold": op.threshold})
    report = IntraReport(method=method, criterion=ctx.criterion, bias_measure=ctx.measure, epsilon=ctx.opts.epsilon,
                         margin=ctx.opts.margin, threshold=op.threshold, tune_default=ctx.default.as_dict(),
                         tune_base=ctx.base.as_dict(), tune_after=op.as_dict(), details=details,
                         fit_seconds=time.perf_counter() - ctx.started)
    patch = build_patch(method, ctx.access, ctx.data, module, op, report, ctx.output_kind)
    ctx.progress(1.0, {"stage": "done", "objective": op.objective})
    return FitResult(patch, report)


class single_thread:
    """torch on one thread for the fit (tiny matmuls: threads cost more than they save), restored after."""

    def __enter__(self) -> None:
        import torch

        self._n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self._n)


def _bench_extras(run: Any) -> dict[str, Any]:
    """The bias measure the method bounded (AIF360 sign: unprivileged minus privileged), before and after."""
    r, b, a = run.report, run.scored.before, run.scored.after
    m = r.bias_measure
    return {"access": "weights", "replaces_model": run.scored.served_by == "patch", "bias_measure": m,
            "epsilon": r.epsilon, "margin": r.margin, "threshold": r.threshold, "bias_before": b[m],
            "bias_after": a[m], "bias_under_epsilon": abs(a[m]) < r.epsilon, "tune_base": r.tune_base,
            "tune_after": r.tune_after, "details": {k: v for k, v in r.details.items() if not isinstance(v, list)}}


# weight access: no queries; `before` is the reference model, `after` the patch's replacement model
BENCH = BenchDefaults(criteria=("dp", "eo"), queries=0, request_id="evaluation", groups=False,
                      extras=_bench_extras)
