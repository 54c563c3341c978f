"""`fairpatch bench reject_option`: reject-option classification (Kamiran et al.), like AIF360's."""

from __future__ import annotations

import argparse
from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("dp", "eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bound", type=float, default=None, help="largest bias accepted on the tune rows (0.05)")


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("reject_option", option_names=("bound",), **kwargs)
