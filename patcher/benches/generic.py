"""`fairpatch bench <method>` for a method without a bench of its own: any registered method on a tabular dataset.

The method reaches the reference model the way its least privileged access kind says (queries and zeroth order:
a counting oracle with `--queries` rows; gradient and weights: the ONNX artifact), fits on the tune split and is
scored on the test split as the gateway would serve the patch (input transform, the upstream or the patch's
replacement model, output transform, the group when the patch needs it).
"""

from __future__ import annotations

import time
from typing import Any

DATASETS = ("adult", "compas", "german")


def run(method: str, dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
        queries: int | None = 1000, seed: int = 0, **options: Any) -> dict[str, Any]:
    from patcher.access import ModelArtifact
    from patcher.benches.groups import groups_block
    from patcher.datasets import load_dataset
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import score
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData

    m = get_method(method)
    data = load_dataset(dataset, sensitive)
    model = reference_model(dataset, data.sensitive, seed=seed, data=data)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    access = m.default_access
    if access in ("gradient", "weights"):
        src: Any = ModelArtifact(model.onnx_bytes, name=f"{dataset}_reference")
        budget = None
    else:
        src, budget = OnnxOracle(model.onnx_bytes, budget=queries), queries
    started = time.perf_counter()
    result = m.run(src, tune, FitRequest(criterion, budget, seed, access=access), options)
    fit_seconds = time.perf_counter() - started

    test = data.test
    upstream = OnnxOracle(model.onnx_bytes, cache=False)  # evaluation: not counted against the budget
    priv = data.group_names.index(data.privileged)
    scored = score(result.patch, upstream.log_probs, test.X, test.y, test.groups, seed=seed, privileged=priv,
                   request_id=f"bench-{seed}")
    per_group = groups_block(data, scored.before_log_probs.argmax(1), scored.after_decisions, seed)
    return {
        "method": method, "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion, "seed": seed,
        "access": access, "query_budget": budget, "queries_used": getattr(src, "queries_used", 0),
        "fit_seconds": round(fit_seconds, 3), "group_at_inference": scored.group_at_inference,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": result.patch.id,
        "before": scored.before, "after": scored.after, **per_group,
    }
