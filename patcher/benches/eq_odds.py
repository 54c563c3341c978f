"""`fairpatch bench eq_odds`: equalized-odds post-processing by linear program (Hardt et al.), like AIF360's."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("eo", "eopp", "dp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objective", choices=("error", "balanced"), default=None,
                        help="error: expected 0-1 loss (the paper); balanced: sum of FPR + FNR per group (AIF360)")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("eq_odds", option_names=("objective",), **kwargs)
