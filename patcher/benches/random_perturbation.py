"""Intra-processing: random perturbation of the weights (weight access), best trial by the phi objective."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.intra import CRITERIA, DATASETS, DEFAULT_QUERIES, add_common_arguments, run_intra

__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--trials", type=int, default=None, help="perturbed copies to try (default 101)")
    parser.add_argument("--stddev", type=float, default=None, help="relative noise size (default 0.1)")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_intra("random_perturbation", **kwargs)
