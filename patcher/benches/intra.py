"""Shared bench for the intra-processing debiasers (random_perturbation, layerwise, adversarial_finetune).

The method gets the reference model's ONNX artifact (weight access, no queries) and the tune split;
`before` is the reference model with its default threshold on the test split, `after` is the weight
patch's replacement ONNX run by the PatchRunner (onnxruntime, as the gateway serves it) on the same
rows. The bias measure the method optimised (spd, eod or aod, AIF360 sign: unprivileged minus
privileged) is reported before and after beside the headline metrics.
"""

from __future__ import annotations

import time
from typing import Any

DATASETS = ("adult", "compas", "german")
CRITERIA = ("dp", "eo")
DEFAULT_QUERIES = 0  # weight access: the methods send no queries


def run_intra(method: str, dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
              seed: int = 0, queries: int | None = None, **options: Any) -> dict[str, Any]:
    """One bench run of an intra-processing method: the JSON `fairpatch bench <method> --json` prints."""
    from patcher.access import ModelArtifact
    from patcher.datasets import load_dataset
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import score
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData

    data = load_dataset(dataset, sensitive)
    model = reference_model(dataset, data.sensitive, seed=seed, data=data)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    started = time.perf_counter()
    result = get_method(method).run(ModelArtifact(model.onnx_bytes, name=f"{dataset}_reference"), tune,
                                    FitRequest(criterion, None, seed), options)
    fit_seconds = time.perf_counter() - started
    patch, report = result.patch, result.report

    test = data.test
    priv = data.group_names.index(data.privileged)
    scored = score(patch, OnnxOracle(model.onnx_bytes).log_probs, test.X, test.y, test.groups, seed=seed,
                   privileged=priv)
    b, a = scored.before, scored.after
    measure = report.bias_measure
    details = {k: v for k, v in report.details.items() if not isinstance(v, list)}
    return {
        "method": method, "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion, "seed": seed,
        "access": "weights", "queries_used": 0, "fit_seconds": round(fit_seconds, 3),
        "group_at_inference": scored.group_at_inference, "replaces_model": scored.served_by == "patch",
        "bias_measure": measure, "epsilon": report.epsilon, "margin": report.margin, "threshold": report.threshold,
        "bias_before": b[measure], "bias_after": a[measure], "bias_under_epsilon": abs(a[measure]) < report.epsilon,
        "tune_base": report.tune_base, "tune_after": report.tune_after, "details": details,
        "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": patch.id,
        "before": b, "after": a,
    }
