"""Peer methods run side by side with Eraser: same dataset splits, same reference model, same metrics.

`threshold_optimizer` is Fairlearn's ThresholdOptimizer (post-processing, group needed at inference)
over the reference model's own scores: `prefit=True`, so the model is never retrained, only its
per-group thresholds are chosen (on the tune split). The result has the JSON shape of
`patcher.pipeline.bench` (`fairpatch bench eraser`), so the two can share one table.

    python benchmarks/peers.py --dataset german --criterion dp
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from patcher.datasets import load_dataset
from patcher.metrics import headline
from patcher.oracle import OnnxOracle
from patcher.reference_models import reference_model

CONSTRAINTS = {"dp": "demographic_parity", "eo": "equalized_odds"}


class OnnxScoreClassifier(ClassifierMixin, BaseEstimator):
    """A deployed ONNX model as an already-fitted sklearn classifier: predict_proba = the model's
    probabilities, every row paid for through the oracle it wraps (so queries are counted)."""

    def __init__(self, oracle: OnnxOracle | None = None) -> None:
        self.oracle = oracle

    def __sklearn_is_fitted__(self) -> bool:  # prefit: nothing to learn
        return True

    @property
    def classes_(self) -> np.ndarray:
        return np.array([0, 1])

    def fit(self, X, y=None):  # never called with prefit=True; here for the sklearn protocol
        return self

    def predict_proba(self, X) -> np.ndarray:
        return np.exp(self.oracle.log_probs(np.asarray(X, dtype=np.float32)))

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)


def threshold_optimizer(dataset: str = "adult", sensitive: str | None = None, criterion: str = "dp",
                        seed: int = 0, drop_sensitive: bool = False, grid_size: int = 1000,
                        evaluate_on: str = "test") -> dict[str, Any]:
    """Fairlearn ThresholdOptimizer (objective accuracy) fitted on the tune split, scored on the test split.
    `evaluate_on="tune"` scores the fitting rows instead: a sanity check only, never a benchmark figure."""
    from fairlearn.postprocessing import ThresholdOptimizer

    if criterion not in CONSTRAINTS:
        raise ValueError(f"criterion {criterion!r}: ThresholdOptimizer here supports {', '.join(CONSTRAINTS)}")
    data = load_dataset(dataset, sensitive, drop_sensitive)
    model = reference_model(dataset, data.sensitive, drop_sensitive=drop_sensitive, seed=seed, data=data)
    if evaluate_on not in ("test", "tune"):
        raise ValueError("evaluate_on must be 'test' or 'tune'")
    tune = data.tune
    test = data.test if evaluate_on == "test" else data.tune
    oracle = OnnxOracle(model.onnx_bytes)  # no budget: ThresholdOptimizer scores every tune row
    opt = ThresholdOptimizer(estimator=OnnxScoreClassifier(oracle), constraints=CONSTRAINTS[criterion],
                             objective="accuracy_score", grid_size=grid_size, prefit=True,
                             predict_method="predict_proba")
    started = time.perf_counter()
    opt.fit(tune.X, tune.y, sensitive_features=tune.groups)
    fit_seconds = time.perf_counter() - started
    queries_used = oracle.queries_used  # distinct tune rows scored during fit

    # Evaluation (the test split is scored only now, after fitting); the randomised thresholds are seeded.
    before = OnnxOracle(model.onnx_bytes).log_probs(test.X).argmax(1)
    after = np.asarray(opt.predict(test.X, sensitive_features=test.groups, random_state=seed)).astype(np.int64)
    priv = data.group_names.index(data.privileged)
    return {**metric_frame_groups(test.y, before, after, test.groups, data.group_names),
        "method": "threshold_optimizer", "dataset": dataset, "sensitive": data.sensitive, "criterion": criterion,
        "seed": seed, "drop_sensitive": drop_sensitive, "query_budget": None,
        "queries_used": queries_used, "fit_seconds": round(fit_seconds, 3),
        "group_at_inference": True, "bias": "group",
        "evaluated_on": evaluate_on, "n_tune": len(tune), "n_test": len(test), "model_sha256": model.sha256,
        "before": headline(test.y, before, test.groups, priv),
        "after": headline(test.y, after, test.groups, priv),
    }


def metric_frame_groups(y: np.ndarray, before: np.ndarray, after: np.ndarray, groups: np.ndarray,
                        names: tuple[str, ...]) -> dict[str, Any]:
    """The per-group table from Fairlearn's MetricFrame (count, selection rate before/after, with Wilson
    intervals), shaped like the benches' `groups`, and its max - min / min / max over all groups."""
    from fairlearn.metrics import MetricFrame, count, selection_rate

    from patcher.metrics import wilson_interval

    labels = np.asarray(names, dtype=object)[groups]
    frames = {k: MetricFrame(metrics={"count": count, "selection_rate": selection_rate}, y_true=y, y_pred=d,
                             sensitive_features=labels) for k, d in (("before", before), ("after", after))}
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "n_test": int(frames["before"].by_group.loc[name, "count"])}
        for k, mf in frames.items():
            sr = float(mf.by_group.loc[name, "selection_rate"])
            lo, hi = wilson_interval(sr * row["n_test"], row["n_test"])
            row[f"selection_rate_{k}"], row[f"selection_rate_{k}_ci"] = sr, [float(lo), float(hi)]
        rows.append(row)
    return {"groups": rows, "metric_frame": {k: {"dp_diff": float(mf.difference()["selection_rate"]),
                                                 "dp_ratio": float(mf.ratio()["selection_rate"])}
                                             for k, mf in frames.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="adult")
    ap.add_argument("--sensitive", default=None,
                    help="as `fairpatch bench`: sex, race:all (every category), sex,race (intersection), ...")
    ap.add_argument("--criterion", default="dp", choices=sorted(CONSTRAINTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-sensitive", action="store_true")
    args = ap.parse_args()
    print(json.dumps(threshold_optimizer(args.dataset, args.sensitive, args.criterion, args.seed,
                                         args.drop_sensitive), indent=1))


if __name__ == "__main__":
    main()
