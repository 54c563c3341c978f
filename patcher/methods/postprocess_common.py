"""Shared pieces of the post-processing methods (thresholds, reject_option, eq_odds, calibrated_eq_odds).

All four are black-box and binary: they read the model's scores on tune rows through the oracle,
learn a per-group decision rule on the score, and need the group at inference. Every rule they
learn has one form, a per-group step function of the model's margin m = log p(1) - log p(0):

    P(decision = 1 | m, g) = bias[g] + sum_k weight[g, k] * [m > cut[g, k]]

and the patch decides 1 when the row's uniform draw u < P (u comes from the request id, so a
replayed request gets the same decision; a deterministic rule has P in {0, 1} and no `uniform`
input). Group thresholds mix two cuts, reject-option moves one cut per group, equalized odds
mixes "keep" and "flip" of the model's own decision. One graph builder serves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from patcher.methods.contract import BenchDefaults, BenchFlag, FitRequest
from patcher.oracle import Oracle
from patcher.scores import to_log_probs
from patcher.tuning import TuningData
from patcher.verdict import default_guard, guard_words

Criterion = Literal["dp", "eo", "eopp"]
BIG = 1e30  # a cut no margin passes (+BIG) or every margin passes (-BIG); float32 holds it
FLIP_MARGIN = 0.01  # |margin| given to a row whose decision the patch flips (probability ~0.5025)


@dataclass(frozen=True)
class Scored:
    """The model's margins on the tune rows that were paid for, with their labels and groups."""

    idx: np.ndarray  # rows of the tuning data that were scored
    margin: np.ndarray  # log p(1) - log p(0), float64
    y: np.ndarray
    groups: np.ndarray
    n_groups: int
    queries_used: int

    @property
    def prob(self) -> np.ndarray:
        """p(1) from the margin (what AIF360-style methods threshold)."""
        return 1.0 / (1.0 + np.exp(-self.margin))


def score_tune(access: Oracle, data: TuningData, request: FitRequest) -> Scored:
    """Score the tune rows through the oracle: all of them when the budget allows, else a uniform random
    subset of `budget` rows (uniform, so rates estimated on it need no reweighting)."""
    report = request.report
    n = len(data)
    limit = request.query_limit(access, n)
    G = data.n_groups
    if limit < 4 * G:
        raise ValueError(f"a budget of {limit} queries is too small: post-processing needs at least {4 * G} "
                         f"scored rows ({G} groups) and does well from about 1000")
    rng = np.random.default_rng(request.seed)
    idx = np.arange(n) if limit >= n else np.sort(rng.choice(n, size=limit, replace=False))
    X = np.asarray(data.X)[idx]
    used_before = access.queries_used
    report(0.05, {"stage": "querying", "rows": int(len(idx))})
    logp = to_log_probs(access.scores(X), access.output_kind)
    if logp.shape[1] != 2:
        raise ValueError(f"post-processing methods need a binary model (2 classes); this one has {logp.shape[1]}")
    y = np.asarray(data.y, np.int64)[idx]
    groups = np.asarray(data.groups, np.int64)[idx]
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("post-processing methods need binary labels 0/1")
    for g in range(G):
        cell = groups == g
        if not cell.any():
            raise ValueError(f"group {data.group_names[g]!r} has no scored tune rows; raise the budget or drop it")
        if len(np.unique(y[cell])) < 2:
            raise ValueError(f"group {data.group_names[g]!r} has only one label among its scored tune rows; "
                             "its error rates are undefined (raise the budget)")
    report(0.5, {"stage": "fitting", "queries_used": access.queries_used - used_before})
    return Scored(idx, logp[:, 1] - logp[:, 0], y, groups, G, access.queries_used - used_before)


def guard_field() -> Any:
    """The `guard` option every post-processing method has."""
    return Field(None, ge=0.0, lt=1.0, description="cross-fit the rule against no patch on the scored rows (each "
                 "fold's rows decided by a rule fitted without them) and return no patch, saying so in the report, "
                 "unless the criterion improved with this one-sided bootstrap confidence (0: no check). Default: 0.9 "
                 "for eo and eopp, no check for dp")


def guard_rule(s: Scored, criterion: str, option: float | None, fit_rule: Callable[[Scored], StepRule],
               request: FitRequest, base_cut: float = 0.0) -> dict[str, Any] | None:
    """patcher.verdict.crossfit_verdict over the scored rows (a uniform sample: no weights needed): each fold's
    rows are decided by `fit_rule` fitted without them (a randomized rule with its own uniform draws) and
    compared with the model's own decision, margin > base_cut. None when the guard is off (`option` 0, or unset
    for dp). A fold whose rule cannot be fitted (e.g. the equalized-odds program has no solution on it) decides
    as the model does, which only makes "improved" harder to reach."""
    from patcher.verdict import crossfit_verdict

    confidence = default_guard(criterion) if option is None else option
    if confidence <= 0:
        return None
    request.report(0.7, {"stage": "cross-fitting the rule against no patch"})
    rng = np.random.default_rng([request.seed, 13])
    base = (s.margin > base_cut).astype(np.int64)

    def decide(keep: np.ndarray, held: np.ndarray) -> np.ndarray:
        part = Scored(s.idx[keep], s.margin[keep], s.y[keep], s.groups[keep], s.n_groups, 0)
        try:
            rule = fit_rule(part)
        except ValueError:
            return base[held]
        return rule.decide(s.margin[held], s.groups[held], rng.random(len(held)) if rule.randomized else None)

    return crossfit_verdict(s.y, s.groups, s.n_groups, criterion, base, decide, confidence=confidence,
                            seed=request.seed)


def guard_refused(guard: dict[str, Any] | None) -> bool:
    """The guard ran and could not show an improvement: the method returns no patch."""
    return guard is not None and guard["verdict"] != "improved"


def guard_report(guard: dict[str, Any] | None) -> dict[str, Any]:
    """The fit report's `guard` and `warning` fields."""
    return {"guard": guard, "warning": guard_words(guard) if guard_refused(guard) else None}


def guard_exclude(guard: dict[str, Any] | None) -> set[str]:
    """Report fields left out of the patch manifest: the guard's, when it did not run."""
    return {"guard", "warning"} if guard is None else set()


def check_criterion(criterion: str, allowed: tuple[str, ...], method: str) -> None:
    if criterion not in allowed:
        raise ValueError(f"{method} supports criterion {', '.join(allowed)}; got {criterion!r}")


@dataclass(frozen=True)
class StepRule:
    """P(1 | m, g) = bias[g] + sum_k weight[g, k] * [m > cut[g, k]]; randomized when some P is in (0, 1)."""

    cuts: np.ndarray  # [G, K] margin cuts (+-BIG for never/always)
    weights: np.ndarray  # [G, K]
    bias: np.ndarray  # [G]

    def prob(self, margin: np.ndarray, groups: np.ndarray) -> np.ndarray:
        steps = (margin[:, None] > self.cuts[groups]).astype(np.float64)
        return np.clip(self.bias[groups] + (steps * self.weights[groups]).sum(1), 0.0, 1.0)

    @property
    def randomized(self) -> bool:
        """True unless every reachable P is 0 or 1 (then no draw is needed)."""
        G, K = self.cuts.shape
        for g in range(G):
            for mask in range(1 << K):  # K <= 2 here: every combination of passed cuts
                p = self.bias[g] + sum(self.weights[g, k] for k in range(K) if mask >> k & 1)
                if 1e-9 < p < 1 - 1e-9:
                    return True
        return False

    def decide(self, margin: np.ndarray, groups: np.ndarray, uniform: np.ndarray | None) -> np.ndarray:
        """The same decision the ONNX graph makes (for tuning and tests)."""
        p = self.prob(margin, groups)
        if uniform is None:
            return (p > 0.5).astype(np.int64)
        return (uniform < p).astype(np.int64)

    def to_json(self) -> dict:
        return {"cuts": self.cuts.tolist(), "weights": self.weights.tolist(), "bias": self.bias.tolist()}


def _margin(g, log_probs: str) -> str:
    one, zero = g.const(np.int64(1), "one"), g.const(np.int64(0), "zero")
    return g.op("Sub", [g.op("Gather", [log_probs, one], axis=1), g.op("Gather", [log_probs, zero], axis=1)])


def _patched_output(g, new_margin: str, output: str) -> None:
    """[N, 2] log-probabilities log_softmax([0, new_margin]): normalised, argmax = the patched decision."""
    zero_col = g.op("Unsqueeze", [g.op("Mul", [new_margin, g.const(np.float32(0.0), "zero_f")]),
                                  g.const(np.array([1], np.int64), "axis")])
    col = g.op("Unsqueeze", [new_margin, g.const(np.array([1], np.int64), "axis")])
    g.op("LogSoftmax", [g.op("Concat", [zero_col, col], axis=1)], output, axis=1)


def step_rule_graph(rule: StepRule, name: str, doc: str) -> bytes:
    """ONNX output transform for a StepRule. Rows the rule keeps on the model's side keep their score;
    rows it flips get margin +-FLIP_MARGIN (just across the boundary): argmax is the decision."""
    from patcher.onnx_graphs import GraphBuilder, float_tensor, int_tensor

    g = GraphBuilder()
    randomized = rule.randomized
    inputs = [float_tensor("log_probs", ["N", 2]), int_tensor("group", ["N"])]
    if randomized:
        inputs.append(float_tensor("uniform", ["N"]))
    margin = _margin(g, "log_probs")
    cuts = g.op("Gather", [g.const(rule.cuts.astype(np.float32), "cuts"), "group"], axis=0)
    weights = g.op("Gather", [g.const(rule.weights.astype(np.float32), "weights"), "group"], axis=0)
    bias = g.op("Gather", [g.const(rule.bias.astype(np.float32), "bias"), "group"], axis=0)
    m2 = g.op("Unsqueeze", [margin, g.const(np.array([1], np.int64), "axis")])
    steps = g.op("Cast", [g.op("Greater", [m2, cuts])], to=1)  # 1 = FLOAT
    summed = g.op("ReduceSum", [g.op("Mul", [steps, weights]), g.const(np.array([1], np.int64), "axis")],
                  keepdims=0)
    prob = g.op("Add", [summed, bias])
    if randomized:
        decision = g.op("Less", ["uniform", prob])
    else:
        decision = g.op("Greater", [prob, g.const(np.float32(0.5), "half")])
    flip = g.const(np.float32(FLIP_MARGIN), "flip")
    up = g.op("Max", [margin, flip])
    down = g.op("Min", [margin, g.op("Neg", [flip])])
    new_margin = g.op("Where", [decision, up, down])
    _patched_output(g, new_margin, "patched_log_probs")
    model = g.model(inputs, [float_tensor("patched_log_probs", ["N", 2])], name, doc=doc)
    return model.SerializeToString()


def score_mix_graph(mix: np.ndarray, replacement_margin: np.ndarray, name: str, doc: str) -> bytes:
    """ONNX output transform: with probability mix[g] (draw u < mix[g]) the row's margin is replaced by
    replacement_margin[g] (calibrated equalized odds: the group's base rate as a logit); else kept."""
    from patcher.onnx_graphs import GraphBuilder, float_tensor, int_tensor

    g = GraphBuilder()
    inputs = [float_tensor("log_probs", ["N", 2]), int_tensor("group", ["N"]), float_tensor("uniform", ["N"])]
    margin = _margin(g, "log_probs")
    mix_g = g.op("Gather", [g.const(mix.astype(np.float32), "mix"), "group"], axis=0)
    repl = g.op("Gather", [g.const(replacement_margin.astype(np.float32), "replacement"), "group"], axis=0)
    new_margin = g.op("Where", [g.op("Less", ["uniform", mix_g]), repl, margin])
    _patched_output(g, new_margin, "patched_log_probs")
    model = g.model(inputs, [float_tensor("patched_log_probs", ["N", 2])], name, doc=doc)
    return model.SerializeToString()


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _bench_extras(run: Any) -> dict[str, Any]:
    """`--draws N` > 1 adds `after_mean`: the test figures averaged over N request ids (a randomized rule's
    expected result)."""
    import onnx

    from patcher.apply import PatchRunner
    from patcher.metrics import headline
    from patcher.pipeline import patched_decisions

    r, test, extra = run.report, run.data.test, {}
    if run.flags["draws"] > 1:
        runner = PatchRunner(run.patch)
        runs = [headline(test.y, patched_decisions(runner, run.model_log_probs, test.X, test.groups,
                                                   f"bench-{run.seed}-{i}", run.scored.before_log_probs),
                         test.groups, run.privileged) for i in range(run.flags["draws"])]
        extra["after_mean"] = {k: float(np.mean([x[k] for x in runs])) for k in runs[0]}
    # randomized: the decisions draw on the per-request uniform input
    graph = onnx.load_from_string(run.patch.part("output_transform")).graph
    return {**extra, "query_budget": run.queries, "randomized": any(i.name == "uniform" for i in graph.input),
            "params": run.patch.manifest["params"], "tune_before": r.tune_before, "tune_after": r.tune_after,
            **({} if getattr(r, "guard", None) is None else {"guard": r.guard, "warning": r.warning})}


# every tune row by default: these methods are meant to read the whole tuning set
BENCH = BenchDefaults(queries=None, extras=_bench_extras, flags=(
    BenchFlag("--draws", {"type": int, "default": 1, "help": "average the test figures over this many request "
                                                             "ids too (after_mean)"}),))
