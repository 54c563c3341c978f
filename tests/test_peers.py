"""benchmarks/peers.py: Fairlearn's ThresholdOptimizer over the reference model, in bench_eraser's JSON shape."""

import numpy as np
import pytest

from benchmarks.peers import OnnxScoreClassifier, threshold_optimizer
from patcher.datasets import load_dataset
from patcher.metrics import HEADLINE
from patcher.oracle import OnnxOracle
from patcher.reference_models import reference_model


@pytest.fixture(scope="module")
def german():
    return load_dataset("german", "age")


@pytest.fixture(scope="module")
def german_model(german):
    return reference_model("german", "age", seed=0, data=german)


def test_score_classifier_is_the_models_probabilities(german, german_model):
    oracle = OnnxOracle(german_model.onnx_bytes)
    proba = OnnxScoreClassifier(oracle).predict_proba(german.tune.X[:20])
    assert proba.shape == (20, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.log(proba), OnnxOracle(german_model.onnx_bytes).log_probs(german.tune.X[:20]),
                               atol=1e-5)
    assert oracle.queries_used == len(np.unique(german.tune.X[:20], axis=0))


@pytest.mark.parametrize("criterion", ["dp", "eo"])
def test_threshold_optimizer_on_german(german, german_model, criterion):
    r = threshold_optimizer("german", "age", criterion, seed=0)
    assert r["method"] == "threshold_optimizer" and r["group_at_inference"] is True
    assert r["queries_used"] == len(np.unique(german.tune.X, axis=0))  # every tune row, nothing else
    assert r["n_test"] == len(german.test) and r["model_sha256"] == german_model.sha256
    for side in ("before", "after"):
        assert set(HEADLINE) <= set(r[side])
        for k in HEADLINE:
            assert 0.0 <= r[side][k] <= 1.0, (side, k, r[side][k])
    # before is the unpatched model on the test split
    before = OnnxOracle(german_model.onnx_bytes).log_probs(german.test.X).argmax(1)
    assert r["before"]["accuracy"] == pytest.approx(float(np.mean(before == german.test.y)))
    # seeded randomisation: the same call gives the same figures
    assert threshold_optimizer("german", "age", criterion, seed=0)["after"] == r["after"]


def test_threshold_optimizer_reduces_dp_on_the_tune_split(german):
    """Where it was fitted, the constrained rule must have a much smaller dp gap than the model
    (on test, German's 200 rows are too few to ask for that reliably)."""
    r = threshold_optimizer("german", "age", "dp", seed=0, evaluate_on="tune")
    assert r["evaluated_on"] == "tune" and r["n_test"] == len(german.tune)
    assert r["before"]["dp_diff"] > 0.05
    assert r["after"]["dp_diff"] < 0.5 * r["before"]["dp_diff"]
    assert r["after"]["accuracy"] > r["before"]["accuracy"] - 0.05


def test_threshold_optimizer_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        threshold_optimizer("german", "age", "eopp")
