"""Shared bench for the intra-processing debiasers (random_perturbation, layerwise, adversarial_finetune).

The method gets the reference model's ONNX artifact (weight access, no queries) and the tune split;
`before` is the reference model with its default threshold on the test split, `after` is the weight
patch's replacement ONNX run by the PatchRunner (onnxruntime, as the gateway serves it) on the same
rows. The bias measure the method optimised (spd, eod or aod, AIF360 sign: unprivileged minus
privileged) is reported before and after beside the headline metrics.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

DATASETS = ("adult", "compas", "german")
CRITERIA = ("dp", "eo")
DEFAULT_QUERIES = 0  # weight access: the methods send no queries


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bias-measure", choices=("spd", "eod", "aod"), default=None,
                        help="the bias the objective bounds (default: dp -> spd, eo -> eod)")
    parser.add_argument("--epsilon", type=float, default=None, help="the bias bound (default 0.05)")
    parser.add_argument("--margin", type=float, default=None,
                        help="tune against epsilon - margin (default 0.01; adversarial 0.02)")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="average phi over this many bootstrap resamples of the rows phi is scored on (default 5; "
                             "0: phi on the rows themselves)")
    parser.add_argument("--se-margin", type=float, default=None,
                        help="feasible cuts need |bias| < epsilon - max(margin, this times the bias estimate's "
                             "standard error) (default 0: the fixed margin only)")


def run_intra(method: str, dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
              seed: int = 0, queries: int | None = None, **options: Any) -> dict[str, Any]:
    """One bench run of an intra-processing method: the JSON `fairpatch bench <method> --json` prints."""
    from patcher.access import ModelArtifact
    from patcher.datasets import load_dataset
    from patcher.methods import get_method
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import score
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData

    module = get_method(method)
    # only the method's own options: the CLI namespace also carries global flags (--url, --timeout)
    options = {k: v for k, v in options.items() if v is not None and k in module.OPTIONS.model_fields}
    data = load_dataset(dataset, sensitive)
    model = reference_model(dataset, data.sensitive, seed=seed, data=data)
    tune = TuningData(data.tune.X, data.tune.y, data.tune.groups, data.group_names, tuple(data.feature_names))
    fit = module.fit

    started = time.perf_counter()
    patch, report = fit(ModelArtifact(model.onnx_bytes, name=f"{dataset}_reference"), tune, criterion, None,
                        seed=seed, **options)
    fit_seconds = time.perf_counter() - started

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
