"""`fairpatch bench forml`: FORML against uniform weighting, same architecture, epochs, data and seed.

Both arms train on the train split (from scratch, or fine-tuning the reference model with --fine-tune);
FORML's exemplar set is the tune split; both are scored on the test split through the patch's ONNX
replacement model. `before` is the uniform-weighting run, `after` the FORML run (tprd and max_fnr included;
for noisy-digits, 10 classes, they are per class as in the paper).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

DATASETS = ("adult", "compas", "german", "colored-digits", "noisy-digits")
DEFAULT_QUERIES = 0  # FORML needs weight access, not queries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fine-tune", action="store_true", help="fine-tune the reference model instead of "
                        "training from scratch (both arms); -o epochs=N sets both arms' epochs (default: 20 "
                        "tabular as the reference recipe, 12 images as the reference CNN)")


def load(dataset: str, sensitive: str | None):
    """(Dataset, privileged group index) for a tabular or image dataset; splits never move with the seed."""
    if dataset in ("colored-digits", "noisy-digits"):
        from patcher.digits import load_digits_dataset

        data = load_digits_dataset(dataset, seed=0)
        if sensitive not in (None, data.sensitive):
            raise ValueError(f"{dataset} has one sensitive attribute: {data.sensitive}")
    else:
        from patcher.datasets import load_dataset

        data = load_dataset(dataset, sensitive)
    return data, data.group_names.index(data.privileged)


def split_data(data, split):
    from patcher.tuning import TuningData

    return TuningData(split.X, split.y, split.groups, data.group_names, tuple(data.feature_names))


def reference_artifact(dataset: str, data, seed: int):
    from patcher.access import ModelArtifact

    if dataset in ("colored-digits", "noisy-digits"):
        from patcher.digits import reference_cnn

        return ModelArtifact(reference_cnn(dataset, seed, data=data).onnx_bytes, f"{dataset}-cnn")
    from patcher.reference_models import reference_model

    return ModelArtifact(reference_model(dataset, data.sensitive, seed=seed, data=data).onnx_bytes, f"{dataset}-mlp")


def run(**kwargs: Any) -> dict[str, Any]:
    return bench_forml(**kwargs)


def bench_forml(**kwargs: Any) -> dict[str, Any]:
    """One FORML run and its uniform-weighting twin: the JSON `fairpatch bench forml --json` prints."""
    return bench_forml_report(**kwargs)[0]


def arm_options(image: bool, epochs: int | None, **options: Any) -> dict[str, Any]:
    """fit options of both arms: the reference recipes (MLP: 20 epochs, batch 256; CNN: 12 epochs, batch 64)."""
    options["epochs"] = epochs or (12 if image else 20)
    if image:
        options.setdefault("batch_size", 64)
        options.setdefault("lr", 3e-3)
        options.setdefault("exemplar_batch", 128)
        options.setdefault("min_per_cell", 8)
    return options


def bench_forml_report(dataset: str = "adult", sensitive: str | None = None, criterion: str = "eopp",
                       seed: int = 0, epochs: int | None = None, meta_loss: str = "mean_loss_d",
                       reverse: str = "none", weight_lr: float | None = None, ce_weight: float | None = None,
                       fine_tune: bool = False, queries: int | None = None,
                       **options: Any) -> tuple[dict[str, Any], Any]:
    """(the bench JSON, the FORML run's FormlReport with its full sample audit)."""
    from patcher.apply import PatchRunner
    from patcher.methods import FitRequest, get_method
    from patcher.methods.forml_audit import summary_metrics
    from patcher.pipeline import patched_decisions

    data, priv = load(dataset, sensitive)
    train, exemplar, test = split_data(data, data.train), split_data(data, data.tune), data.test
    options = arm_options(train.X.ndim == 4, epochs, meta_loss=meta_loss, reverse=reverse, **options)
    if weight_lr is not None:
        options["weight_lr"] = weight_lr
    if ce_weight is not None:
        options["ce_weight"] = ce_weight
    access = reference_artifact(dataset, data, seed) if fine_tune else None
    n_classes = int(data.train.y.max()) + 1

    def arm(uniform: bool) -> tuple[dict[str, float], Any, Any, float]:
        started = time.perf_counter()
        result = get_method("forml").run(access, train, FitRequest(criterion, None, seed, exemplar=exemplar),
                                         {**options, "uniform": uniform})
        patch, report = result.patch, result.report
        seconds = time.perf_counter() - started
        pred = patched_decisions(PatchRunner(patch), None, test.X, test.groups, None)  # a weight patch
        return summary_metrics(test.y, pred, test.groups, n_classes, priv), patch, report, seconds

    before, _, base_report, base_seconds = arm(uniform=True)
    after, patch, report, seconds = arm(uniform=False)
    return {
        "method": "forml", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion, "seed": seed,
        "queries_used": 0, "fit_seconds": round(seconds, 3), "uniform_fit_seconds": round(base_seconds, 3),
        "group_at_inference": False, "fine_tune": fine_tune, "architecture": report.architecture,
        "epochs": report.epochs, "meta_loss": report.meta_loss, "meta_groups": report.meta_groups,
        "reverse": report.reverse, "weight_lr": patch.manifest["params"]["weight_lr"],
        "ce_weight": patch.manifest["params"]["ce_weight"],
        "n_train": report.n_train, "n_exemplar": report.n_exemplar, "n_test": len(test), "patch_id": patch.id,
        "weight_quantiles": report.audit.weight_quantiles, "weight_by_cell": report.audit.weight_by_cell,
        "n_condensed": len(report.audit.condensed_indices),
        "exemplar_before": base_report.exemplar_metrics, "exemplar_after": report.exemplar_metrics,
        "before": before, "after": after,
    }, report
