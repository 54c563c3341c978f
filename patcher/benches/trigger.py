"""`fairpatch bench trigger`: Fairness Reprogramming, fitted on the tune split, scored on the test split.

`--access gradient` fits through the model's ONNX artifact (torch via onnx2torch; no queries);
`--access zeroth_order` through a counting oracle with `--queries` rows at most. `--sweep-lam` trains
one trigger per lambda and prints the accuracy-fairness curve (test split) instead of one result.
Tabular datasets use the reference MLP (patcher.reference_models); colored-digits the reference CNN
(patcher.digits). `--transfer-seed S` also scores the trigger on a second reference model trained
with seed S (the paper's transfer setting).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

DATASETS = ("adult", "compas", "german", "colored-digits")
CRITERIA = ("dp", "eo", "eopp")
DEFAULT_QUERIES = 50_000
SWEEP_LAMS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--access", choices=("gradient", "zeroth_order"), default="gradient",
                        help="gradient: through the model artifact; zeroth_order: scores only, --queries rows")
    parser.add_argument("--sweep-lam", action="store_true", help="print the accuracy-fairness curve over lambda")
    parser.add_argument("--transfer-seed", type=int, default=None,
                        help="also score the trigger on the reference model trained with this seed")


def run(**kwargs: Any) -> dict[str, Any]:
    if kwargs.pop("sweep_lam", False):
        return sweep_lam(**kwargs)
    return bench_trigger(**kwargs)


def load(dataset: str, sensitive: str | None, seed: int):
    """(dataset, reference model) for a tabular or an image task."""
    if dataset == "colored-digits":
        from patcher.digits import load_digits_dataset, reference_cnn

        if sensitive not in (None, "color"):
            raise ValueError("colored-digits has one sensitive attribute: color")
        data = load_digits_dataset(dataset)
        return data, reference_cnn(dataset, seed, data=data)
    from patcher.datasets import load_dataset
    from patcher.reference_models import reference_model

    data = load_dataset(dataset, sensitive)
    return data, reference_model(dataset, data.sensitive, seed=seed, data=data)


def dataset_options(dataset: str, trigger: str | None = None) -> dict[str, Any]:
    """Per-task defaults: colored digits runs the trigger method's `colored-digits` preset, or with another
    trigger form asked for (`trigger`), `colored-digits-frame` (the frame's zeroth-order search settings)."""
    if dataset != "colored-digits":
        return {}
    from patcher.methods import get_method

    name = "colored-digits" if trigger in (None, "color") else "colored-digits-frame"
    return dict(get_method("trigger").presets[name])


def _scores(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    from patcher.oracle import OnnxOracle

    return OnnxOracle(onnx_bytes, cache=False).log_probs(X)  # evaluation: not counted against any budget


def evaluate(patch, onnx_bytes: bytes, split, priv, seed: int):
    """Test-split headline metrics without and with the patch (patcher.pipeline.score), budget-free."""
    from patcher.oracle import OnnxOracle
    from patcher.pipeline import score

    return score(patch, OnnxOracle(onnx_bytes, cache=False).log_probs, split.X, split.y, split.groups, seed=seed,
                 privileged=priv)


def fit_trigger(data, model, criterion: str, access: str, queries: int | None, seed: int, **options):
    from patcher.access import ModelArtifact
    from patcher.methods import FitRequest, get_method
    from patcher.oracle import OnnxOracle
    from patcher.tuning import TuningData

    tune = data.tune
    tdata = TuningData(tune.X, tune.y, tune.groups, data.group_names, tuple(data.feature_names))
    opts = {**dataset_options(data.name, options.get("trigger")), **{k: v for k, v in options.items() if v is not None}}
    if access == "gradient":
        src, budget = ModelArtifact(model.onnx_bytes, data.name), None
    else:
        src, budget = OnnxOracle(model.onnx_bytes, budget=queries), queries
    started = time.perf_counter()
    result = get_method("trigger").run(src, tdata, FitRequest(criterion, budget, seed, access=access), opts)
    return result.patch, result.report, time.perf_counter() - started


def bench_trigger(dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
                  access: str = "gradient", queries: int | None = DEFAULT_QUERIES, seed: int = 0,
                  lam: float | None = None, transfer_seed: int | None = None, **options) -> dict[str, Any]:
    """One trigger run: the JSON `fairpatch bench trigger` prints."""
    data, model = load(dataset, sensitive, seed)
    patch, report, fit_seconds = fit_trigger(data, model, criterion, access, queries, seed, lam=lam, **options)
    test, priv = data.test, data.group_names.index(data.privileged)
    scored = evaluate(patch, model.onnx_bytes, test, priv, seed)
    out = {
        "method": "trigger", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion,
        "seed": seed, "access": access, "lam": report.lam, "query_budget": queries if access != "gradient" else None,
        "queries_used": report.queries_used, "fit_seconds": round(fit_seconds, 3), "group_at_inference": False,
        "threshold": report.threshold, "trigger": report.trigger, "steps": report.steps,
        "candidates": report.candidates, "selection": report.selection,
        "tune_before": report.tune_before, "tune_after": report.tune_after,
        "n_tune": len(data.tune), "n_test": len(test), "model_sha256": model.sha256, "patch_id": patch.id,
        "before": scored.before, "after": scored.after,
    }
    if transfer_seed is not None:
        _, other = load(dataset, sensitive, transfer_seed)
        moved = evaluate(patch, other.onnx_bytes, test, priv, seed)
        out["transfer"] = {"seed": transfer_seed, "model_sha256": other.sha256, "before": moved.before,
                           "after": moved.after}
    return out


def sweep_lam(dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
              access: str = "gradient", queries: int | None = DEFAULT_QUERIES, seed: int = 0,
              lam: float | None = None, transfer_seed: int | None = None, lams: tuple[float, ...] = SWEEP_LAMS,
              **options) -> dict[str, Any]:
    """One trigger per lambda (each with its re-tuned threshold); test-split accuracy and fairness."""
    from patcher.metrics import headline

    data, model = load(dataset, sensitive, seed)
    test, priv = data.test, data.group_names.index(data.privileged)
    before = headline(test.y, _scores(model.onnx_bytes, test.X).argmax(1), test.groups, priv)
    curve = []
    for value in lams:
        patch, report, fit_seconds = fit_trigger(data, model, criterion, access, queries, seed, lam=value, **options)
        after = evaluate(patch, model.onnx_bytes, test, priv, seed).after
        curve.append({"lam": value, "threshold": report.threshold, "queries_used": report.queries_used,
                      "fit_seconds": round(fit_seconds, 3), **{k: after[k] for k in
                                                               ("accuracy", "dp_diff", "eo_diff",
                                                                "worst_group_accuracy")}})
    return {"method": "trigger", "mode": "sweep-lam", "dataset": dataset, "sensitive": data.sensitive,
            "criterion": criterion, "access": access, "seed": seed, "query_budget": queries,
            "before": before, "curve": curve}


def print_result(result: dict[str, Any]) -> None:
    """A table: the lambda curve in sweep mode, before/after otherwise."""
    from rich.console import Console
    from rich.table import Table

    b = result["before"]
    if result.get("mode") == "sweep-lam":
        table = Table(title=f"trigger lambda sweep: {result['dataset']} ({result['sensitive']}), criterion "
                            f"{result['criterion']}, {result['access']} (test split; before: accuracy "
                            f"{b['accuracy']:.4f}, dp {b['dp_diff']:.4f}, eo {b['eo_diff']:.4f})")
        for col in ("lam", "accuracy", "dp_diff", "eo_diff", "worst_group_accuracy", "threshold", "queries_used"):
            table.add_column(col, justify="right")
        for p in result["curve"]:
            table.add_row(*(f"{p[c]:.4g}" if isinstance(p[c], float) else str(p[c]) for c in
                            ("lam", "accuracy", "dp_diff", "eo_diff", "worst_group_accuracy", "threshold",
                             "queries_used")))
        Console().print(table)
        return
    table = Table(title=f"trigger on {result['dataset']} ({result['sensitive']}), criterion {result['criterion']}, "
                        f"{result['access']}, {result['queries_used']} queries, lam {result['lam']:g}")
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, v in b.items():
        a = result["after"][key]
        table.add_row(key, f"{v:.4f}", f"{a:.4f}", f"{a - v:+.4f}")
    Console().print(table)
    print(f"fit {result['fit_seconds']:.2f}s, threshold {result['threshold']:.4g}")
