"""FORML's training loop (Yan, Seto, Apostoloff, ICML 2022, Algorithm 1): sample weights learned by meta-learning.

Every training row i has one global weight logit w_i; a batch is weighted by softmax(w) over the batch, so
all-zero logits are exactly uniform weighting. Per batch:

1. lookahead: theta~ = theta - eta_c * grad_theta sum_i softmax(w)_i l_i(theta)   (torch.func.functional_call,
   no model copy; `reverse` in ("model", "both") takes the step with the opposite sign, appendix A.2);
2. meta step: on an exemplar batch with a minimum count per (group, label) cell, the fairness meta-loss of
   theta~ (MaxLossD / MeanLossD, or cross-entropy as the ablation) is differentiated through the lookahead to
   the batch's logits: w <- w - eta_f * B * grad_w (`reverse` in ("weights", "both") flips the sign);
3. the real step on theta with the new softmax weights, with the model's own optimizer (Adam, as the
   reference recipe and the paper's Celeb-A setting).

Departures from the paper, on purpose: the weight gradient is scaled by the batch size B (softmax weights are
~1/B, so the raw gradient shrinks with B and a per-row learning rate would otherwise depend on it); the
meta-loss can add `ce_weight` times the exemplar cross-entropy so the weights keep accuracy in view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from patcher.methods.forml import MetaLoss, Reverse

GroupCriterion = Literal["eopp", "eo", "dp", "loss"]


# ---------------------------------------------------------------- exemplar sampling


class ExemplarSampler:
    """Exemplar batches with at least `min_per_cell` rows of every (group, label) cell present in the set
    (drawn with replacement when a cell is smaller), the rest of the batch drawn uniformly."""

    def __init__(self, groups: np.ndarray, y: np.ndarray, batch_size: int, min_per_cell: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)  # its own stream: the training order never depends on it
        cells = np.asarray(groups, np.int64) * (int(np.max(y)) + 1) + np.asarray(y, np.int64)
        self.cells = [np.flatnonzero(cells == c) for c in np.unique(cells)]
        self.cell_keys = [(int(g), int(lab)) for g, lab in
                          sorted({(int(a), int(b)) for a, b in zip(groups, y, strict=True)})]
        self.n = len(cells)
        self.min_per_cell = min_per_cell
        self.batch_size = max(batch_size, min_per_cell * len(self.cells))

    def sample(self) -> np.ndarray:
        parts = [self.rng.choice(rows, self.min_per_cell, replace=len(rows) < self.min_per_cell)
                 for rows in self.cells]
        rest = self.batch_size - self.min_per_cell * len(self.cells)
        if rest > 0:
            parts.append(self.rng.choice(self.n, min(rest, self.n), replace=False))
        return np.concatenate(parts)


# ---------------------------------------------------------------- meta-losses


def group_losses(logits: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, criterion: GroupCriterion,
                 n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-cell losses, pooled loss of the rows in scope); the discrepancy is measured between them.

    eopp: cross-entropy of each group's positives (TPR parity; binary labels; for more classes, of all its rows:
    per-class recall parity when the group is the class); eo: each (group, label) cell against its label's
    pooled loss; dp: each group's mean probability of class 1 (soft selection rate); loss: each group's CE."""
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    if criterion == "dp":
        value, scope = torch.softmax(logits, 1)[:, 1], torch.ones_like(y, dtype=torch.bool)
    elif criterion == "eopp" and logits.shape[1] == 2:
        value, scope = ce, y == 1
    else:
        value, scope = ce, torch.ones_like(y, dtype=torch.bool)
    if criterion == "eo":
        cells, pooled = [], []
        for label in torch.unique(y):
            in_label = y == label
            for g in range(n_groups):
                m = in_label & (groups == g)
                if m.any():
                    cells.append(value[m].mean())
                    pooled.append(value[in_label].mean())
        return torch.stack(cells), torch.stack(pooled)
    losses = [value[scope & (groups == g)].mean() for g in range(n_groups) if (scope & (groups == g)).any()]
    return torch.stack(losses), value[scope].mean().expand(len(losses))


def meta_loss(logits: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, kind: MetaLoss,
              criterion: GroupCriterion, n_groups: int, ce_weight: float = 0.0) -> torch.Tensor:
    """MaxLossD / MeanLossD: max / mean over cells of |cell loss - pooled loss|; cross_entropy: the ablation."""
    ce = nn.functional.cross_entropy(logits, y)
    if kind == "cross_entropy":
        return ce
    cells, pooled = group_losses(logits, y, groups, criterion, n_groups)
    gaps = (cells - pooled).abs()
    disc = gaps.max() if kind == "max_loss_d" else gaps.mean()
    return disc + ce_weight * ce if ce_weight else disc


# ---------------------------------------------------------------- one FORML step


def lookahead(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              w_batch: torch.Tensor, lr: float, reverse_model: bool) -> dict[str, torch.Tensor]:
    """theta~ = theta -/+ lr * grad_theta sum softmax(w)_i l_i, differentiable in w (Algorithm 1 steps 6-8)."""
    losses = nn.functional.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    loss = (torch.softmax(w_batch, 0) * losses).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    sign = 1.0 if reverse_model else -1.0
    return {k: p + sign * lr * g for (k, p), g in zip(params.items(), grads, strict=True)}


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lookahead_lr: float = 0.1
    weight_lr: float = 1.0
    meta_loss: MetaLoss = "mean_loss_d"
    criterion: GroupCriterion = "eopp"
    ce_weight: float = 0.0
    reverse: Reverse = "none"
    exemplar_batch: int = 512
    min_per_cell: int = 32
    ema_decay: float = 0.9
    uniform: bool = False  # the baseline: same loop, same batches, no meta step (weights stay uniform)
    seed: int = 0


@dataclass
class TrainResult:
    weight_logits: np.ndarray  # w, one per training row
    ema_weighted_loss: np.ndarray  # EMA over visits of B * softmax(w)_i * l_i (uniform weights: the plain loss)
    history: list[dict[str, float]] = field(default_factory=list)
    batches: int = 0


def train(model: nn.Module, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, gv: np.ndarray,
          n_groups: int, cfg: TrainConfig, progress: Callable[[float, dict], None] | None = None,
          device: torch.device | str = "cpu") -> TrainResult:
    """Train `model` (on `device`) in place with FORML (or uniform weights when cfg.uniform) and return the
    learned weights."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order drawn on the CPU: alike on every device
    Xt, yt = torch.tensor(X, dtype=torch.float32, device=device), torch.tensor(y, dtype=torch.long, device=device)
    Xvt = torch.tensor(Xv, dtype=torch.float32, device=device)
    yvt, gvt = torch.tensor(yv, dtype=torch.long, device=device), torch.tensor(gv, dtype=torch.long, device=device)
    sampler = ExemplarSampler(gv, yv, cfg.exemplar_batch, cfg.min_per_cell, cfg.seed + 7919)
    n = len(Xt)
    w = torch.zeros(n, device=device)
    ema = torch.full((n,), float("nan"), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rev_model, rev_weights = cfg.reverse in ("model", "both"), cfg.reverse in ("weights", "both")
    model.train()
    history: list[dict[str, float]] = []
    batches = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        meta_sum, meta_n = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size].to(device)
            x, yb = Xt[idx], yt[idx]
            if not cfg.uniform:
                params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
                w_batch = w[idx].clone().requires_grad_(True)
                ahead = lookahead(model, params, x, yb, w_batch, cfg.lookahead_lr, rev_model)
                ex = torch.as_tensor(sampler.sample(), device=device)
                m = meta_loss(functional_call(model, ahead, (Xvt[ex],)), yvt[ex], gvt[ex], cfg.meta_loss,
                              cfg.criterion, n_groups, cfg.ce_weight)
                (gw,) = torch.autograd.grad(m, w_batch)
                step = cfg.weight_lr * len(idx) * gw
                w[idx] += step if rev_weights else -step
                meta_sum, meta_n = meta_sum + float(m.detach()), meta_n + 1
            p = torch.softmax(w[idx], 0)
            losses = nn.functional.cross_entropy(model(x), yb, reduction="none")
            opt.zero_grad()
            (p * losses).sum().backward()
            opt.step()
            with torch.no_grad():
                weighted = len(idx) * p * losses.detach()
                prev = ema[idx]
                ema[idx] = torch.where(prev.isnan(), weighted, cfg.ema_decay * prev + (1 - cfg.ema_decay) * weighted)
            batches += 1
        row = {"epoch": epoch + 1, "meta_loss": meta_sum / max(meta_n, 1), "weight_std": float(w.std())}
        history.append(row)
        if progress:
            progress((epoch + 1) / cfg.epochs, row)
    model.eval()
    return TrainResult(w.cpu().numpy().copy(), ema.nan_to_num(0.0).cpu().numpy().copy(), history, batches)
