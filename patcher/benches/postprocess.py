"""Shared bench for the post-processing methods (thresholds, reject_option, eq_odds, calibrated_eq_odds).

Fits the method through a counting oracle on the tune split (every tune row by default) and scores
the held-out test split: `before` is the reference model's own decision, `after` the patch run by
PatchRunner with the group and one request id (so a randomized rule's draws are reproducible).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from patcher.apply import PatchRunner
from patcher.benches.groups import groups_block
from patcher.datasets import load_dataset
from patcher.metrics import headline
from patcher.oracle import OnnxOracle
from patcher.pipeline import patched_decisions, score
from patcher.reference_models import reference_model
from patcher.tuning import TuningData

DATASETS = ("adult", "compas", "german")
DEFAULT_QUERIES = None  # every tune row: these methods are meant to read the whole tuning set
REQUEST_ID = "bench"  # the test split is scored as one request: its draws are fixed


def run_method(method: str, dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
               queries: int | None = None, seed: int = 0, *, draws: int = 1, **options: Any) -> dict[str, Any]:
    """One run: the JSON `fairpatch bench <method>` prints; `options` are the method's. `draws` > 1 adds
    `after_mean`: the test figures averaged over that many request ids (a randomized rule's expected result)."""
    from patcher.methods import FitRequest, get_method

    data = load_dataset(dataset, sensitive)
    model = reference_model(dataset, data.sensitive, seed=seed, data=data)
    oracle = OnnxOracle(model.onnx_bytes, budget=queries)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    started = time.perf_counter()
    result = get_method(method).run(oracle, tune, FitRequest(criterion, queries, seed), options)
    fit_seconds = time.perf_counter() - started
    patch, report = result.patch, result.report

    test = data.test
    model_log_probs = OnnxOracle(model.onnx_bytes).log_probs  # evaluation: not counted against the budget
    runner = PatchRunner(patch)
    priv = data.group_names.index(data.privileged)
    scored = score(runner, model_log_probs, test.X, test.y, test.groups, seed=seed, privileged=priv,
                   request_id=f"{REQUEST_ID}-{seed}")
    extra: dict[str, Any] = {}
    per_group = groups_block(data, scored.before_log_probs.argmax(1), scored.after_decisions, seed)
    if draws > 1:
        runs = [headline(test.y, patched_decisions(runner, model_log_probs, test.X, test.groups,
                                                   f"{REQUEST_ID}-{seed}-{i}", scored.before_log_probs),
                            test.groups, priv)
                for i in range(draws)]
        extra["after_mean"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    return {**extra,
        "method": method, "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion,
        "seed": seed, "query_budget": queries, "queries_used": report.queries_used,
        "fit_seconds": round(fit_seconds, 3), "group_at_inference": scored.group_at_inference,
        "randomized": _randomized(patch.part("output_transform")), "params": patch.manifest["params"],
        "tune_before": report.tune_before, "tune_after": report.tune_after,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": patch.id,
        "before": scored.before, "after": scored.after, **per_group,
    }


def _randomized(graph: bytes) -> bool:
    """Whether the patch's decisions draw on the per-request uniform input."""
    import onnx

    return any(i.name == "uniform" for i in onnx.load_from_string(graph).graph.input)
