"""`fairpatch bench eraser`: Inference-Time Rule Eraser through a counting oracle on the tune split."""

from __future__ import annotations

import argparse
import time
from typing import Any

from patcher.benches.groups import groups_block
from patcher.datasets import feature_columns, load_dataset
from patcher.oracle import OnnxOracle
from patcher.pipeline import score
from patcher.reference_models import reference_model
from patcher.tuning import TuningData

DATASETS = ("adult", "compas", "german")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-free", action="store_true", help="no group at inference: infer it from x")
    parser.add_argument("--drop-sensitive", action="store_true",
                        help="the model never saw the sensitive column (implies proxies only)")
    parser.add_argument("--proxies", default=None, type=lambda s: s.split(","),
                        help="comma-separated raw columns to use as bias features (e.g. "
                             "relationship,marital_status) instead of the group; no group is needed at inference")


def run(**kwargs: Any) -> dict[str, Any]:
    return bench_eraser(**kwargs)


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

    from patcher.methods import FitRequest, get_method

    started = time.perf_counter()
    result = get_method("eraser").run(oracle, tune, FitRequest(criterion, queries, seed), options)
    fit_seconds = time.perf_counter() - started
    patch, report = result.patch, result.report

    test = data.test
    priv = data.group_names.index(data.privileged)
    # evaluation: a second session of the model, not counted against the budget
    model_log_probs = OnnxOracle(model.onnx_bytes).log_probs
    scored = score(patch, model_log_probs, test.X, test.y, test.groups, seed=seed, privileged=priv)
    per_group = groups_block(data, scored.before_log_probs.argmax(1), scored.after_decisions, seed)
    return {
        "method": "eraser", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion,
        "seed": seed, "drop_sensitive": drop_sensitive, "query_budget": queries,
        "queries_used": report.queries_used, "fit_seconds": round(fit_seconds, 3),
        "group_at_inference": scored.group_at_inference, "bias": report.bias,
        "alpha": report.alpha, "threshold": report.threshold,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": patch.id,
        "before": scored.before, "after": scored.after, **per_group,
    }
