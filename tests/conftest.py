"""Shared fixtures: real datasets, real ONNX models (small ones built from numpy for speed)."""

from __future__ import annotations

import numpy as np
import pytest

from patcher.onnx_graphs import mlp_model


@pytest.fixture(scope="session")
def adult():
    from patcher.datasets import load_dataset

    return load_dataset("adult", "sex")


@pytest.fixture(scope="session")
def adult_model(adult):
    """The cached Adult reference model (trained once per machine)."""
    from patcher.reference_models import reference_model

    return reference_model("adult", "sex", seed=0, data=adult)


def random_mlp(d: int, c: int = 2, hidden: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return mlp_model([(rng.normal(size=(d, hidden)), rng.normal(size=hidden)),
                      (rng.normal(size=(hidden, c)), rng.normal(size=c))])


@pytest.fixture()
def small_model() -> bytes:
    return random_mlp(5)
