"""The per-group part of a bench's JSON: every group's size and rates before/after with intervals, and the gaps
and ratios over all groups with bootstrap intervals (small groups make test gaps noisy: the intervals say how)."""

from __future__ import annotations

from typing import Any

import numpy as np

from patcher.datasets import Dataset
from patcher.metrics import gap_intervals, group_table


def groups_block(data: Dataset, before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """`groups` (one row per group on the test split, n_tune added), `merged_cells` (raw cells pooled into an
    "other (...)" group; empty for binary specs) and `gaps` ({"before", "after"}: dp/eo gaps and ratios)."""
    test = data.test
    rows = group_table(test.y, {"before": before, "after": after}, test.groups, data.group_names)
    n_tune = np.bincount(data.tune.groups, minlength=len(data.group_names))
    for row, nt in zip(rows, n_tune, strict=True):
        row["n_test"] = row.pop("n")
        row["n_tune"] = int(nt)
    return {"groups": rows, "merged_cells": list(data.merged),
            "gaps": {"before": gap_intervals(test.y, before, test.groups, seed=seed),
                     "after": gap_intervals(test.y, after, test.groups, seed=seed)}}
