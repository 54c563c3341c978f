"""Benchmark harness: fit a method on the tune split through a counting oracle, score on the test split.

Shared by the `fairpatch bench` modules (patcher.benches) and benchmarks/. The test split is never seen by the
method: it is scored with a separate, unbudgeted session of the same model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patcher.metrics import fairness_report

HEADLINE = ("accuracy", "balanced_accuracy", "dp_diff", "eo_diff", "worst_group_accuracy")


def headline(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, privileged: Any = None) -> dict[str, float]:
    summary = fairness_report(y, pred, groups, privileged=privileged).summary
    keys = (*HEADLINE, "tprd", "max_fnr", "eopp_diff") + (("spd", "aod", "eod") if privileged is not None else ())
    return {k: float(summary[k]) for k in keys if summary.get(k) is not None}


def feature_columns(feature_names: list[str], columns: list[str]) -> list[int]:
    """Encoded feature indices of raw columns (a numeric column, or every one-hot `col=value`)."""
    idx = [i for i, n in enumerate(feature_names) if n in columns or n.split("=", 1)[0] in columns]
    missing = [c for c in columns if not any(n == c or n.startswith(c + "=") for n in feature_names)]
    if missing:
        raise ValueError(f"no such column(s) {missing}; the model's inputs come from "
                         f"{sorted({n.split('=', 1)[0] for n in feature_names})}")
    return idx
