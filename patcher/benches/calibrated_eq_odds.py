"""`fairpatch bench calibrated_eq_odds`: calibrated equalized odds (Pleiss et al.), like AIF360's."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cost-constraint", choices=("fpr", "fnr", "weighted"), default=None,
                        help="the cost equalised across groups (default: weighted for eo, fnr for eopp)")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("calibrated_eq_odds", option_names=("cost_constraint",), **kwargs)
