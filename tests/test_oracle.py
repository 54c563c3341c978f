import numpy as np
import onnxruntime as ort
import pytest

from patcher.oracle import BudgetExceeded, OnnxOracle
from patcher.scores import from_log_probs, to_log_probs
from tests.conftest import random_mlp


def _offline(model: bytes, X: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": X.astype(np.float32)})[0]


def test_scores_match_onnxruntime_and_count_rows(small_model):
    X = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    oracle = OnnxOracle(small_model, budget=100, batch_size=7)
    np.testing.assert_allclose(oracle.scores(X), _offline(small_model, X), rtol=1e-6)
    assert oracle.queries_used == 50
    assert oracle.remaining == 50
    assert oracle._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_before_batch_sees_every_batch_and_can_stop_the_next_one(small_model):
    X = np.random.default_rng(4).normal(size=(20, 5)).astype(np.float32)
    oracle = OnnxOracle(small_model, batch_size=8)
    seen: list[int] = []
    oracle.before_batch = seen.append
    oracle.scores(X)
    assert seen == [8, 8, 4] and oracle.queries_used == 20

    def stop(rows: int) -> None:
        raise RuntimeError("stopped")

    oracle.before_batch = stop
    with pytest.raises(RuntimeError, match="stopped"):
        oracle.scores(X + 1)
    assert oracle.queries_used == 20  # nothing was sent, nothing is counted
    np.testing.assert_array_equal(oracle.scores(X), _offline(small_model, X))  # paid rows: no batch, no hook


def test_paid_rows_are_not_paid_twice(small_model):
    X = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float32)
    oracle = OnnxOracle(small_model, budget=40)
    first = oracle.scores(X[:20])
    again = oracle.scores(np.vstack([X[:20], X[:20]]))  # duplicates inside one call cost once too
    assert oracle.queries_used == 20
    np.testing.assert_array_equal(again[:20], first)
    oracle.scores(X[10:30])  # 10 old rows, 10 new
    assert oracle.queries_used == 30


def test_budget_refused_before_anything_is_sent(small_model):
    X = np.random.default_rng(3).normal(size=(30, 5)).astype(np.float32)
    oracle = OnnxOracle(small_model, budget=25)
    oracle.scores(X[:20])
    with pytest.raises(BudgetExceeded, match="over the budget of 25"):
        oracle.scores(X[10:30])  # needs 10 new rows, only 5 left
    assert oracle.queries_used == 20
    oracle.scores(X[20:25])
    assert oracle.queries_used == 25


def test_without_cache_every_row_counts(small_model):
    X = np.ones((4, 5), np.float32)
    oracle = OnnxOracle(small_model, cache=False)
    oracle.scores(X)
    oracle.scores(X)
    assert oracle.queries_used == 8


def test_log_probs_of_every_output_kind_agree():
    z = np.array([[0.3, -1.2], [2.0, 0.5]])
    lp = to_log_probs(z, "logits")
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0)
    np.testing.assert_allclose(to_log_probs(np.exp(lp), "probabilities"), lp, atol=1e-9)
    margin = (z[:, 1] - z[:, 0])[:, None]
    np.testing.assert_allclose(to_log_probs(margin, "logits"), lp, atol=1e-9)
    p1 = 1 / (1 + np.exp(-margin))
    np.testing.assert_allclose(to_log_probs(p1, "probabilities"), lp, atol=1e-9)
    np.testing.assert_allclose(from_log_probs(lp, "logits", 1), margin, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        to_log_probs(np.zeros((2, 2, 2)))


def test_empty_input_is_an_error():
    oracle = OnnxOracle(random_mlp(3))
    with pytest.raises(ValueError, match="no rows"):
        oracle.scores(np.zeros((0, 3), np.float32))
