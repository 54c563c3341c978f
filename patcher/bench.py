"""Benchmark harness: fit a method on the tune split through a counting oracle, score on the test split.

Shared by `fairpatch bench` and the scripts in benchmarks/. The test split is never seen by the
method: it is scored with a separate, unbudgeted session of the same model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from patcher.apply import PatchRunner
from patcher.datasets import load_dataset
from patcher.metrics import fairness_report
from patcher.oracle import OnnxOracle
from patcher.reference_models import reference_model
from patcher.tuning import TuningData

HEADLINE = ("accuracy", "balanced_accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")


def headline(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, privileged: Any = None) -> dict[str, float]:
    summary = fairness_report(y, pred, groups, privileged=privileged).summary
    keys = (*HEADLINE, "tprd", "max_fnr", "eopp_diff") + (("spd", "aod", "eod") if privileged is not None else ())
    return {k: float(summary[k]) for k in keys if summary.get(k) is not None}


def feature_columns(feature_names: list[str], columns: list[str]) -> list[int]:
    """Encoded feature indices of raw columns (a numeric column, or every one-hot `col=value`)."""
    idx = [i for i, n in enumerate(feature_names) if n in columns or n.split("=", 1)[0] in columns]
    missing = [c for c in columns if not any(n == c or n.startswith(c + "=") for n in feature_names)]
    if missing:
        raise ValueError(f"no such column(s) {missing}; the model's inputs come from "
                         f"{sorted({n.split('=', 1)[0] for n in feature_names})}")
    return idx


def bench_eraser(dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
                 queries: int | None = 1000, seed: int = 0, group_free: bool = False,
                 drop_sensitive: bool = False, proxies: list[str] | None = None, **options) -> dict[str, Any]:
    """One Eraser run: the JSON the `fairpatch bench eraser` command prints. `proxies` (raw column
    names) makes the bias features those columns instead of the group."""
    data = load_dataset(dataset, sensitive, drop_sensitive)
    model = reference_model(dataset, data.sensitive, drop_sensitive=drop_sensitive, seed=seed, data=data)
    oracle = OnnxOracle(model.onnx_bytes, budget=queries)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    if proxies:
        options.update(bias="proxies", proxy_columns=feature_columns(data.feature_names, proxies))
    options.setdefault("bias", "estimator" if group_free else "group")
    options.setdefault("seed", seed)

    from patcher.methods import eraser

    started = time.perf_counter()
    patch, report = eraser.fit(oracle, tune, criterion, queries, **options)
    fit_seconds = time.perf_counter() - started

    test = data.test
    logp = OnnxOracle(model.onnx_bytes).log_probs(test.X)  # evaluation: not counted against the budget
    runner = PatchRunner(patch)
    before = logp.argmax(1)
    after = runner.predict(test.X, logp, test.groups if runner.needs_group else None)
    priv = data.group_names.index(data.privileged)
    return {
        "method": "eraser", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion,
        "seed": seed, "drop_sensitive": drop_sensitive, "query_budget": queries,
        "queries_used": report.queries_used, "fit_seconds": round(fit_seconds, 3),
        "group_at_inference": runner.needs_group, "bias": report.bias,
        "alpha": report.alpha, "threshold": report.threshold,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": patch.id,
        "before": headline(test.y, before, test.groups, priv),
        "after": headline(test.y, after, test.groups, priv),
    }


BENCHES = {"eraser": bench_eraser}
