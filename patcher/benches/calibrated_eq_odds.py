"""`fairpatch bench calibrated_eq_odds`: calibrated equalized odds (Pleiss et al.), like AIF360's."""

from __future__ import annotations

from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "run"]


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("calibrated_eq_odds", **kwargs)
