"""`fairpatch bench thresholds`: group-specific (randomized) thresholds, like Fairlearn's ThresholdOptimizer."""

from __future__ import annotations

from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("dp", "eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "run"]


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("thresholds", **kwargs)
