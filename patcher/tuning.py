"""The tuning data a method learns a patch from: inputs in the model's own format, labels, groups."""

from __future__ import annotations

from collections.abc import Sequence
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


SeedLike = int | Sequence[int] | np.random.Generator


def stratified_split(y: np.ndarray, groups: np.ndarray, shares: float | Sequence[float], seed: SeedLike, *,
                     hold_one: bool = False) -> list[np.ndarray]:
    """Sorted row indices cut into parts within every (group, label) cell, so small cells keep their share.

    `shares`: one fraction h gives two parts (h of every cell, then the rest); a sequence of fractions summing
    to 1 gives one part each. Each cell, in (group, label) order, is shuffled with one permutation drawn from
    `seed` (an int, a sequence of ints or a Generator) and cut at the rounded cumulative shares.
    `hold_one` (two parts): the first part gets at least one row of every cell that has two or more, none of
    a one-row cell, so an exemplar set sees every cell while the training part keeps every cell too.
    """
    y, groups = np.asarray(y, np.int64), np.asarray(groups, np.int64)
    fractions = (shares, 1.0 - shares) if isinstance(shares, (int, float)) else tuple(shares)
    if hold_one and len(fractions) != 2:
        raise ValueError(f"hold_one needs two parts; got shares {fractions}")
    rng = np.random.default_rng(seed)
    cells = groups * (int(y.max()) + 1) + y
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(cells):
        idx = rng.permutation(np.flatnonzero(cells == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        if hold_one:
            cuts = np.array([max(1, int(cuts[0])) if len(idx) > 1 else 0])
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
