"""The tuning data a method learns a patch from: inputs in the model's own format, labels, groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TuningData:
    X: np.ndarray  # model inputs, [N, ...] in the model's own input format
    y: np.ndarray  # true labels, int [N]
    groups: np.ndarray  # group id per row, int [N], index into group_names
    group_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()  # for tabular inputs: names of X's columns
    bias_features: np.ndarray | None = field(default=None)  # optional user-chosen [N, k] bias features

    def __post_init__(self) -> None:
        n = len(self.X)
        if n == 0:
            raise ValueError("tuning data is empty")
        if len(self.y) != n or len(self.groups) != n:
            raise ValueError(f"X has {n} rows but y has {len(self.y)} and groups {len(self.groups)}")
        if self.bias_features is not None and len(self.bias_features) != n:
            raise ValueError(f"bias_features has {len(self.bias_features)} rows, X has {n}")
        g = np.asarray(self.groups)
        if not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError("groups must be non-negative integer ids (index into group_names)")
        if self.group_names and g.max() >= len(self.group_names):
            raise ValueError(f"group id {int(g.max())} has no name in {self.group_names}")
        if not self.group_names:
            object.__setattr__(self, "group_names", tuple(str(i) for i in range(int(g.max()) + 1)))

    def __len__(self) -> int:
        return len(self.X)

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def subset(self, idx: np.ndarray) -> TuningData:
        bf = None if self.bias_features is None else self.bias_features[idx]
        return TuningData(self.X[idx], self.y[idx], self.groups[idx], self.group_names, self.feature_names, bf)


def stratified_holdout(y: np.ndarray, groups: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices holding out `share` of every (group, label) cell (rounded per cell): rows a method
    selects on (lambda, threshold, epoch) that it did not fit."""
    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    cells = groups * (int(y.max()) + 1) + y
    held = [rng.permutation(np.flatnonzero(cells == c))[: int(round(share * int((cells == c).sum())))]
            for c in np.unique(cells)]
    return np.sort(np.concatenate(held))

