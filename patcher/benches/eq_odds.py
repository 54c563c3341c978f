"""`fairpatch bench eq_odds`: equalized-odds post-processing by linear program (Hardt et al.), like AIF360's."""

from __future__ import annotations

from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("eo", "eopp", "dp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "run"]


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("eq_odds", **kwargs)
