"""The fairness side of trigger training: the discriminator, a direct rate-gap loss, the threshold.

- `Discriminator` d_phi predicts the group from the model's (temperature-scaled) softmax s: for dp it
  sees s only; for eo it also sees s * onehot(y) (so it can only use s within a label); for eopp it
  is trained and evaluated on positive rows only. The trigger maximises its cross-entropy.
- `gap_loss`: a differentiable stand-in for the criterion itself, the squared gap (patcher.metrics'
  definition) of the groups' mean class-1 probability (dp), within each label (eo), or among positives
  (eopp). It needs no second network, so the zeroth-order path uses it: every term is a plain function of scores.
- `operating_point`: a decision threshold re-tuned on the tuning rows after the trigger (binary
  tasks), chosen like Eraser's: least unfairness under an accuracy-drop cap, then most accuracy;
  `worst_cell_point` instead: the best worst (group, label) cell accuracy under an unfairness target.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from patcher.methods.eraser import choose_operating_point, sweep_thresholds
from patcher.metrics import sweep

Criterion = Literal["dp", "eo", "eopp"]


def rows_for(criterion: Criterion, y: torch.Tensor) -> torch.Tensor:
    """The rows the criterion looks at: all of them, or the positives for eopp."""
    return y == 1 if criterion == "eopp" else torch.ones_like(y, dtype=torch.bool)


class Discriminator(nn.Module):
    def __init__(self, n_classes: int, n_groups: int, criterion: Criterion, hidden: int = 32) -> None:
        super().__init__()
        self.criterion, self.n_classes = criterion, n_classes
        width = n_classes * (1 + n_classes) if criterion == "eo" else n_classes
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_groups))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = torch.softmax(logits / self.log_temperature.exp(), dim=1)
        if self.criterion == "eo":
            onehot = nn.functional.one_hot(y, self.n_classes).to(s.dtype)
            s = torch.cat([s, (s[:, :, None] * onehot[:, None, :]).flatten(1)], dim=1)
        return self.net(s)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        keep = rows_for(self.criterion, y)
        return nn.functional.cross_entropy(self(logits[keep], y[keep]), groups[keep])


def gap_loss(logits: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, n_groups: int,
             criterion: Criterion) -> torch.Tensor:
    """Squared spread of the groups' mean P(class 1) within the criterion's cells: the square of
    patcher.metrics.rate_gap (max - min over the groups with rows) of the soft rates, kept in torch so it
    stays differentiable."""
    p = torch.softmax(logits, dim=1)[:, -1]
    cells = [torch.ones_like(y, dtype=torch.bool)] if criterion == "dp" else \
        [y == 1] if criterion == "eopp" else [y == 0, y == 1]
    total = logits.new_zeros(())
    for cell in cells:
        means = [p[cell & (groups == a)].mean() for a in range(n_groups) if bool((cell & (groups == a)).any())]
        if len(means) > 1:
            m = torch.stack(means)
            total = total + (m.max() - m.min()) ** 2
    return total


def cell_weights(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-row weights under which every (group, label) cell present counts equally (mean weight 1):
    accuracy and loss for a population where the group says nothing about the label."""
    cells = np.asarray(groups, np.int64) * (int(np.max(y)) + 1) + np.asarray(y, np.int64)
    _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    return len(cells) / (len(counts) * counts[inverse].astype(np.float64))


def operating_point(margins: list[tuple[float, np.ndarray]], y: np.ndarray, groups: np.ndarray, n_groups: int,
                    criterion: Criterion, base_acc: float, tolerance: float, max_drop: float | None,
                    weights: np.ndarray | None = None) -> tuple[float, float, float, float, list[dict]]:
    """Pick (key, threshold) over candidate triggers' margins log p1 - log p0 on the tuning rows.
    Returns (key, threshold, accuracy, unfairness, per-candidate summary)."""
    curve, summary = [], []
    for key, margin in margins:
        cuts, acc, unfair = sweep_thresholds(margin, y, groups, n_groups, criterion, weights)
        curve.append((key, cuts, acc, unfair))
        j = int(np.argmin(np.abs(cuts)))  # the trigger alone, threshold 0
        ok = acc >= base_acc - (max_drop if max_drop is not None else np.inf) - 1e-12
        k = int(np.argmin(np.where(ok, np.maximum(unfair, tolerance) - 1e-9 * acc, np.inf))) if ok.any() else j
        summary.append({"key": key, "accuracy_at_0": float(acc[j]), "unfairness_at_0": float(unfair[j]),
                        "threshold": float(cuts[k]), "accuracy": float(acc[k]), "unfairness": float(unfair[k])})
    key, threshold, acc, unfair = choose_operating_point(curve, base_acc, tolerance, max_drop)
    return key, threshold, acc, unfair, summary


def cell_accuracy_curve(margin: np.ndarray, y: np.ndarray, groups: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Per cut (decision margin > cut), the least accuracy over the (group, label) cells present."""
    r = sweep(margin, y, groups, int(np.max(groups)) + 1, cuts=cuts).rates()
    return np.fmin.reduce(np.concatenate([r["tpr"], r["tnr"]], axis=-1), axis=-1, initial=np.inf)


def worst_cell_point(margins: list[tuple[float, np.ndarray]], y: np.ndarray, groups: np.ndarray, n_groups: int,
                     criterion: Criterion, target: float, weights: np.ndarray | None = None,
                     ) -> tuple[float, float, float, float, list[dict]]:
    """Pick (key, threshold) with the best worst-cell accuracy among the points whose unfairness is at most
    `target` (none: the least unfair point). Returns (key, threshold, accuracy (`weights`), unfairness,
    summary)."""
    best, best_rank, summary = None, None, []
    for key, margin in margins:
        cuts, acc, unfair = sweep_thresholds(margin, y, groups, n_groups, criterion, weights)
        worst = cell_accuracy_curve(margin, y, groups, cuts)
        rank = np.where(unfair <= target, -worst, 1.0 + unfair)  # feasible points first, then the least unfair
        k, j = int(np.argmin(rank)), int(np.argmin(np.abs(cuts)))
        summary.append({"key": key, "accuracy_at_0": float(acc[j]), "unfairness_at_0": float(unfair[j]),
                        "threshold": float(cuts[k]), "accuracy": float(acc[k]), "unfairness": float(unfair[k]),
                        "worst_cell_accuracy": float(worst[k])})
        if best_rank is None or (rank[k], unfair[k]) < best_rank:
            best_rank, best = (rank[k], unfair[k]), (key, float(cuts[k]), float(acc[k]), float(unfair[k]))
    return (*best, summary)
