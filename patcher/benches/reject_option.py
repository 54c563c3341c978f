"""`fairpatch bench reject_option`: reject-option classification (Kamiran et al.), like AIF360's."""

from __future__ import annotations

from typing import Any

from patcher.benches.postprocess import DATASETS, DEFAULT_QUERIES, run_method

CRITERIA = ("dp", "eo", "eopp")
__all__ = ["CRITERIA", "DATASETS", "DEFAULT_QUERIES", "run"]


def run(**kwargs: Any) -> dict[str, Any]:
    return run_method("reject_option", **kwargs)
