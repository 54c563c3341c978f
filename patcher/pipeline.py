"""Scoring a patch on held-out rows exactly as the gateway serves it, before and after, through patcher.metrics,
and `bench`, the one `fairpatch bench` runner: load a task, fit a method on the tune split, score the test split.

One scoring template for every caller (the job worker, the bench, benchmarks/): input transform -> the model (or the
patch's replacement model) -> output transform, with randomized decisions drawn from a request id so a score
can be reproduced. The model is any function from inputs to [N, C] log-probabilities (an oracle's
`log_probs`), so an HTTP upstream, an ONNX session and a budget-free copy of either all fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from patcher.apply import PatchRunner
from patcher.metrics import gap_intervals, group_table, headline
from patcher.patch import Patch
from patcher.scores import to_log_probs

if TYPE_CHECKING:
    from patcher.datasets import Dataset
    from patcher.tuning import TuningData

LogProbs = Callable[[np.ndarray], np.ndarray]  # model inputs [N, ...] -> log-probabilities [N, C]


def patched_decisions(runner: PatchRunner, model_log_probs: LogProbs | None, X: np.ndarray, groups: np.ndarray,
                      request_id: str | None, base_log_probs: np.ndarray | None = None) -> np.ndarray:
    """The patched decision of every row, as the gateway makes it. `base_log_probs`: the model's answer on X
    when the caller has it already (no input transform: the model is not asked again). `model_log_probs` may
    be None for a weight patch, which serves its own model."""
    seen = runner.transform_inputs(X)
    if runner.replaces_model:
        logp = to_log_probs(runner.model_logits(seen), "logits")
    elif seen is X and base_log_probs is not None:
        logp = base_log_probs
    elif model_log_probs is None:
        raise ValueError("this patch is applied to the model's output: pass the model (model_log_probs)")
    else:
        logp = model_log_probs(seen)  # a trigger changes what the model sees
    return runner.predict(seen, logp, groups if runner.needs_group else None, request_id=request_id)


@dataclass(frozen=True)
class Score:
    """Headline metrics on the held-out rows without and with the patch, and how the patch was served."""

    before: dict[str, float]
    after: dict[str, float]
    group_at_inference: bool
    served_by: str  # "patch" (a weight patch's replacement model) or "upstream"
    before_log_probs: np.ndarray  # the model's answer on the rows: callers need not ask it again
    after_decisions: np.ndarray


def score(patch: Patch | PatchRunner, model_log_probs: LogProbs, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
          *, seed: int, privileged: Any = None, request_id: str | None = None) -> Score:
    """Run the model alone and model + patch on (X, y, groups) and report both through patcher.metrics.headline
    (`privileged` adds AIF360's signed metrics). The held-out rows are scored as one request, id
    `request_id` (default "evaluation-{seed}"), so a randomized patch gives the same decisions every time."""
    runner = patch if isinstance(patch, PatchRunner) else PatchRunner(patch)
    logp = model_log_probs(X)
    rid = request_id if request_id is not None else f"evaluation-{seed}"
    after = patched_decisions(runner, model_log_probs, X, groups, rid, base_log_probs=logp)
    return Score(before=headline(y, logp.argmax(1), groups, privileged), after=headline(y, after, groups, privileged),
                 group_at_inference=runner.needs_group, served_by="patch" if runner.replaces_model else "upstream",
                 before_log_probs=logp, after_decisions=after)


DIGITS = ("colored-digits", "noisy-digits")


def load_data(dataset: str, sensitive: str | None, drop_sensitive: bool = False) -> Dataset:
    """A tabular or an image dataset; its splits never move with any seed."""
    if dataset in DIGITS:
        from patcher.digits import load_digits_dataset

        data = load_digits_dataset(dataset)
        if sensitive not in (None, data.sensitive):
            raise ValueError(f"{dataset} has one sensitive attribute: {data.sensitive}")
        return data
    from patcher.datasets import load_dataset

    return load_dataset(dataset, sensitive, drop_sensitive)


def reference(data: Dataset, seed: int, drop_sensitive: bool = False) -> Any:
    """The dataset's reference model trained with `seed` (cached): `.onnx_bytes`, `.sha256`."""
    if data.name in DIGITS:
        from patcher.digits import reference_cnn

        return reference_cnn(data.name, seed, data=data)
    from patcher.reference_models import reference_model

    return reference_model(data.name, data.sensitive, drop_sensitive=drop_sensitive, seed=seed, data=data)


def load_task(dataset: str, sensitive: str | None, seed: int, drop_sensitive: bool = False) -> tuple[Dataset, Any]:
    """(the dataset, its reference model trained with `seed`)."""
    data = load_data(dataset, sensitive, drop_sensitive)
    return data, reference(data, seed, drop_sensitive)


def tuning_data(data: Dataset, split: Any) -> TuningData:
    from patcher.tuning import TuningData

    return TuningData(split.X, split.y, split.groups, data.group_names, tuple(data.feature_names))


def groups_block(data: Dataset, before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """`groups` (one row per group on the test split, n_tune added), `merged_cells` (raw cells pooled into an
    "other (...)" group; empty for binary specs) and `gaps` ({"before", "after"}: dp/eo gaps and ratios, with
    bootstrap intervals: small groups make test gaps noisy)."""
    test = data.test
    rows = group_table(test.y, {"before": before, "after": after}, test.groups, data.group_names)
    n_tune = np.bincount(data.tune.groups, minlength=len(data.group_names))
    for row, nt in zip(rows, n_tune, strict=True):
        row["n_test"] = row.pop("n")
        row["n_tune"] = int(nt)
    return {"groups": rows, "merged_cells": list(data.merged),
            "gaps": {"before": gap_intervals(test.y, before, test.groups, seed=seed),
                     "after": gap_intervals(test.y, after, test.groups, seed=seed)}}


@dataclass(frozen=True)
class BenchRun:
    """One fitted and scored bench run, as a method's `bench.extras` hook sees it."""

    data: Dataset
    model: Any  # the reference model (.onnx_bytes, .sha256)
    flags: dict[str, Any]  # the method's own bench flags
    access: str
    budget: int | None  # the oracle's budget (None: gradient or weight access, or no limit)
    queries: int | None  # --queries as given
    patch: Patch
    report: Any  # the method's report model
    scored: Score
    model_log_probs: LogProbs  # budget-free
    privileged: int
    seed: int


def bench_flags(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the method's own bench flags out of `kwargs` (the rest are its options), defaults filled in."""
    from patcher.methods import get_method

    flags = {}
    for f in get_method(method).bench.flags:
        dest = f.name.lstrip("-").replace("-", "_")
        default = f.kwargs.get("default", False if f.kwargs.get("action") == "store_true" else None)
        flags[dest] = kwargs.pop(dest, default)
    return flags


def bench(method: str, dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
          queries: int | None = -1, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """One `fairpatch bench <method>` run, the JSON it prints. `kwargs`: the method's own bench flags
    (`Method.bench.flags`) and its options. `queries` -1: the method's bench default. The method reaches the
    reference model the way its access kind says (queries, zeroth order: a counting oracle with `queries`
    rows; gradient, weights: the ONNX artifact), fits on the tune split and is scored on the test split,
    which it never saw, as the gateway would serve the patch."""
    import time

    from patcher.access import ModelArtifact
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle

    m = get_method(method)
    b = m.bench
    queries = b.queries if queries == -1 else queries
    flags, options = bench_flags(method, kwargs), kwargs
    if b.instead is not None:
        common = {"dataset": dataset, "sensitive": sensitive, "criterion": criterion, "queries": queries,
                  "seed": seed}
        result = b.instead(flags, common, options)
        if result is not None:
            return result
    data, model = load_task(dataset, sensitive, seed, flags.get("drop_sensitive", False))
    tune = tuning_data(data, data.tune)
    if b.prepare is not None:
        options = b.prepare(options, flags, data)
    access = flags.get("access") or b.access or m.default_access
    if access in ("gradient", "weights"):
        src: Any = ModelArtifact(model.onnx_bytes, name=b.artifact_name.format(dataset))
        budget = None
    else:
        src, budget = OnnxOracle(model.onnx_bytes, budget=queries), queries
    started = time.perf_counter()
    fitted = m.run(src, tune, FitRequest(criterion, budget, seed, access=access), options)
    fit_seconds = time.perf_counter() - started

    test, priv = data.test, data.group_names.index(data.privileged)
    model_log_probs = OnnxOracle(model.onnx_bytes, cache=False).log_probs  # evaluation: not counted
    scored = score(fitted.patch, model_log_probs, test.X, test.y, test.groups, seed=seed, privileged=priv,
                   request_id=f"{b.request_id}-{seed}")
    used = getattr(fitted.report, "queries_used", None)
    out: dict[str, Any] = {
        "method": method, "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion, "seed": seed,
        "queries_used": used if used is not None else getattr(src, "queries_used", 0),
        "fit_seconds": round(fit_seconds, 3), "group_at_inference": scored.group_at_inference,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": fitted.patch.id,
        "before": scored.before, "after": scored.after,
    }
    if b.extras is None:
        out.update(access=access, query_budget=budget)
    else:
        out.update(b.extras(BenchRun(data, model, flags, access, budget, queries, fitted.patch, fitted.report,
                                     scored, model_log_probs, priv, seed)))
    if b.groups:
        out.update(groups_block(data, scored.before_log_probs.argmax(1), scored.after_decisions, seed))
    return out
