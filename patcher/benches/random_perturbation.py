"""Intra-processing: random perturbation of the weights (weight access), best trial by the phi objective."""

from __future__ import annotations

from typing import Any

from patcher.benches.intra import CRITERIA, DATASETS, DEFAULT_QUERIES, run_intra

__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "run"]


def run(**kwargs: Any) -> dict[str, Any]:
    return run_intra("random_perturbation", **kwargs)
