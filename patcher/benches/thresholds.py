"""`fairpatch bench thresholds`: group-specific (randomized) thresholds, like Fairlearn's ThresholdOptimizer."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, add_tolerance, run_method

CRITERIA = ("dp", "eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_tolerance(parser)
    parser.add_argument("--objective", choices=("accuracy", "balanced_accuracy"), default=None)


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("thresholds", option_names=("tolerance", "objective"), **kwargs)
