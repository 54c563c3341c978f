"""patcher.pipeline.score: a patch scored on held-out rows as the gateway serves it (real ONNX models and patches)."""

from __future__ import annotations

import numpy as np
import pytest

from patcher.apply import PatchRunner
from patcher.metrics import headline
from patcher.onnx_graphs import GraphBuilder, float_tensor
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.pipeline import patched_decisions, score
from patcher.scores import to_log_probs
from patcher.tuning import TuningData
from tests.conftest import fit, random_mlp


@pytest.fixture(scope="module")
def eq_odds_patch(adult, adult_model):
    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    patch, _ = fit("eq_odds", OnnxOracle(adult_model.onnx_bytes), tune, "eo")
    return patch


def test_a_randomized_output_patch_is_scored_reproducibly_as_the_gateway_applies_it(adult, adult_model,
                                                                                   eq_odds_patch):
    test, oracle = adult.test, OnnxOracle(adult_model.onnx_bytes)
    first = score(eq_odds_patch, oracle.log_probs, test.X, test.y, test.groups, seed=3, privileged=1)
    again = score(eq_odds_patch, oracle.log_probs, test.X, test.y, test.groups, seed=3, privileged=1)
    assert first.after == again.after and np.array_equal(first.after_decisions, again.after_decisions)
    logp = oracle.log_probs(test.X)
    runner = PatchRunner(eq_odds_patch)
    by_hand = runner.predict(test.X, logp, test.groups, request_id="evaluation-3")
    assert np.array_equal(first.after_decisions, by_hand)
    assert first.before == headline(test.y, logp.argmax(1), test.groups, 1)
    assert first.after == headline(test.y, by_hand, test.groups, 1) and "spd" in first.after
    assert first.group_at_inference and first.served_by == "upstream"
    other = score(eq_odds_patch, oracle.log_probs, test.X, test.y, test.groups, seed=4)
    assert not np.array_equal(other.after_decisions, first.after_decisions)  # other draws


def _shift_inputs(d: int, shift: float) -> bytes:
    g = GraphBuilder()
    g.op("Add", ["x", g.const(np.full(d, shift, np.float32), "shift")], "shifted")
    return g.model([float_tensor("x", ["N", d])], [float_tensor("shifted", ["N", d])], "shift").SerializeToString()


def test_an_input_transform_is_what_the_model_sees():
    rng = np.random.default_rng(0)
    X, y, groups = rng.normal(size=(300, 5)).astype(np.float32), rng.integers(0, 2, 300), rng.integers(0, 3, 300)
    model = OnnxOracle(random_mlp(5), cache=False)
    patch = Patch.build(method="shift", n_classes=2, groups=["a", "b", "c"], input_transform=_shift_inputs(5, 0.7))
    s = score(patch, model.log_probs, X, y, groups, seed=0)
    assert model.queries_used == 2 * len(X)  # the plain rows, then the transformed ones
    assert np.array_equal(s.after_decisions, model.log_probs(X + np.float32(0.7)).argmax(1))
    assert s.after == headline(y, s.after_decisions, groups) and not s.group_at_inference


def test_a_weight_patch_serves_its_own_model_and_needs_no_upstream_for_its_decisions():
    rng = np.random.default_rng(1)
    X, y, groups = rng.normal(size=(200, 5)).astype(np.float32), rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    replacement = random_mlp(5, seed=7)
    patch = Patch.build(method="weights", n_classes=2, groups=["a", "b"], replacement_model=replacement)
    upstream = OnnxOracle(random_mlp(5, seed=1), cache=False)
    s = score(patch, upstream.log_probs, X, y, groups, seed=0)
    expected = to_log_probs(OnnxOracle(replacement).scores(X), "logits").argmax(1)
    assert s.served_by == "patch" and np.array_equal(s.after_decisions, expected)
    assert upstream.queries_used == len(X)  # "before" only
    assert np.array_equal(patched_decisions(PatchRunner(patch), None, X, groups, None), expected)
    output_patch = Patch.build(method="shift", n_classes=2, groups=["a", "b"], input_transform=_shift_inputs(5, 1.0))
    with pytest.raises(ValueError, match="pass the model"):
        patched_decisions(PatchRunner(output_patch), None, X, groups, None)
