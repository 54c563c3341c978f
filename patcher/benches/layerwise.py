"""Intra-processing: layer-wise optimisation of the last tensors with gradient-boosted trees (weight access)."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.intra import CRITERIA, DATASETS, DEFAULT_QUERIES, add_common_arguments, run_intra

__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--layers", type=int, default=None, help="last parameter tensors to optimise (default 5)")
    parser.add_argument("--calls", type=int, default=None, help="objective evaluations per tensor (default 20)")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_intra("layerwise", **kwargs)
