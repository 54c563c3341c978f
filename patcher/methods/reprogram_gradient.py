"""Trigger training with gradient access: backpropagate through the frozen model (a torch module).

The alternating min-max of Fairness Reprogramming: per batch, one discriminator step (predict the
group from the model's output), then one trigger step with the projected gradient of Zhang et al.
2018, g = g_u - (g_u . g^_adv) g^_adv - lam * g_adv, fed to Adam. With fairness="gap" the trigger step
is g_u + lam * grad(gap_loss) instead (no discriminator).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from patcher.methods.reprogram_fairness import Criterion, Discriminator, gap_loss
from patcher.methods.reprogram_triggers import Trigger


def project(g_u: torch.Tensor, g_adv: torch.Tensor, lam: float) -> torch.Tensor:
    """g_u without its component along g_adv (which would help the adversary), minus lam * g_adv."""
    norm = g_adv.norm()
    if norm <= 1e-12:
        return g_u
    unit = g_adv / norm
    return g_u - (g_u @ unit) * unit - lam * g_adv


def train_trigger(model: nn.Module, trigger: Trigger, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                  n_groups: int, criterion: Criterion, lam: float, *, steps: int, batch_size: int, lr: float,
                  adv_lr: float, fairness: str, seed: int, n_classes: int, weights: np.ndarray | None = None,
                  tick: Callable[[int], None] | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Train one trigger at one lambda on `device` (where `model` is); returns its parameters, on the CPU.
    `weights`: per-row weights of the utility loss (e.g. every (group, label) cell counting equally)."""
    gen = torch.Generator().manual_seed(seed)  # batch order drawn on the CPU: alike on every device
    torch.manual_seed(seed)
    Xt, yt, gt = (torch.tensor(X, dtype=torch.float32, device=device), torch.tensor(y, device=device),
                  torch.tensor(groups, device=device))
    wt = torch.ones(len(y), device=device) if weights is None else \
        torch.tensor(weights, dtype=torch.float32, device=device)
    theta = trigger.init().float().to(device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    disc = Discriminator(n_classes, n_groups, criterion).to(device) if fairness == "adversary" else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=adv_lr) if disc is not None else None
    n = len(Xt)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size].to(device)
        pos += batch_size
        xb, yb, gb, wb = Xt[idx], yt[idx], gt[idx], wt[idx]
        logits = model(trigger.apply(xb, theta))
        utility = (nn.functional.cross_entropy(logits, yb, reduction="none") * wb).sum() / wb.sum()
        if disc is not None:
            disc_opt.zero_grad()
            disc.loss(logits.detach(), yb, gb).backward()
            disc_opt.step()
            g_u, = torch.autograd.grad(utility, theta, retain_graph=True)
            g_adv, = torch.autograd.grad(disc.loss(logits, yb, gb), theta)
            grad = project(g_u, g_adv, lam)
        else:
            loss = utility + lam * gap_loss(logits, yb, gb, n_groups, criterion)
            grad, = torch.autograd.grad(loss, theta)
        opt.zero_grad()
        theta.grad = grad
        opt.step()
        if tick is not None:
            tick(step)
    return theta.detach().cpu()


def model_logits(model: nn.Module, X: np.ndarray, trigger: Trigger | None = None, theta: torch.Tensor | None = None,
                 batch: int = 8192, device: torch.device | str = "cpu") -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            xb = torch.tensor(X[i:i + batch], dtype=torch.float32, device=device)
            if trigger is not None:
                xb = trigger.apply(xb, theta.float().to(device))
            out.append(model(xb).double().cpu().numpy())
    return np.concatenate(out)
