"""Zeroth-order tabular triggers through a distilled surrogate: queries buy a local copy of the model, the trigger
is trained on the copy with gradients (free), and queries then score the trained triggers on the real model.

The randomized estimates of reprogram_zo spend every query on one noisy gradient step; at 10,000 queries that is
about 30 steps and a selection on 625 rows. Here the budget goes in three parts:

1. the model's own scores on `B / 4` tuning rows (at most all of them): the surrogate's data, and later the
   untouched model's side of the selection (the accuracy cap is a paired difference on the same rows);
2. the model's scores on `B / 2 - (1)` rows whose trigger columns are moved by a random trigger each (gain and
   offset drawn per row), so the surrogate learns how the score responds where a trigger moves those columns;
3. the rest: each trained trigger (one per lambda in `zo_lams`) scored on the same rows as (1), and the candidate
   and threshold chosen there by the options' rule.

The surrogate is a small MLP fitted to the model's probabilities (soft cross-entropy) on standardised inputs. It
needs no knowledge of the model's form; only its scores are used. Its margins track the model's loosely, but the
trigger it yields moves the real model almost as a trigger trained on the real model's gradients does
(docs/triggers_zo_dev.md); whatever it gets wrong, the selection sees on real scores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from patcher.methods.reprogram_fairness import Criterion
from patcher.methods.reprogram_gradient import train_trigger
from patcher.methods.reprogram_triggers import TabularTrigger
from patcher.oracle import Oracle
from patcher.scores import to_log_probs

# Ranges of the random triggers that perturb the surrogate's rows (gain, offset per trigger column): wide enough
# to hold the identity, a column set to a constant, and a flipped indicator.
GAIN_RANGE = (-0.5, 1.5)
OFFSET_RANGE = (-0.5, 1.0)


class Surrogate(nn.Module):
    """An MLP on standardised inputs, returning two-or-more-class logits."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, n_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        d = len(mean)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def perturbed_rows(X: np.ndarray, trigger: TabularTrigger, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` rows drawn from X (with replacement), each with its trigger columns moved by its own random gain and
    offset."""
    rows = X[rng.integers(0, len(X), n)].astype(np.float32, copy=True)
    k = trigger.k
    gain, offset = rng.uniform(*GAIN_RANGE, (n, k)), rng.uniform(*OFFSET_RANGE, (n, k))
    rows[:, trigger.columns] = rows[:, trigger.columns] * gain + offset
    return rows


def distill(X: np.ndarray, log_probs: np.ndarray, seed: int, steps: int = 3000, batch: int = 256) -> Surrogate:
    """A surrogate fitted to the model's probabilities on X (`steps` Adam steps of `batch` rows)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Surrogate(X.mean(0), X.std(0) + 1e-3, log_probs.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    Xt, P = torch.tensor(X, dtype=torch.float32), torch.tensor(log_probs, dtype=torch.float32).exp()
    order, pos = torch.randperm(len(Xt), generator=gen), 0
    for _ in range(steps):
        if pos + batch > len(Xt):
            order, pos = torch.randperm(len(Xt), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = -(P[idx] * torch.log_softmax(model(Xt[idx]), 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def surrogate_candidates(oracle: Oracle, trigger: TabularTrigger, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                         n_groups: int, criterion: Criterion, lams: list[float], budget: int, seed: int, *,
                         steps: int, batch_size: int, lr: float, fairness: str = "gap", adv_lr: float = 1e-2,
                         weights: np.ndarray | None = None,
                         tick: Callable[[float, dict], None] | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, np.ndarray, np.ndarray]]]:
    """(selection rows, the model's log-probabilities on them, [(lam, theta, log-probabilities on them)]), spending
    at most `budget` queries (see the module docstring)."""
    rng = np.random.default_rng([seed, 17])
    used0 = oracle.queries_used
    spent = lambda: oracle.queries_used - used0  # noqa: E731
    score = lambda Z: to_log_probs(oracle.scores(Z), oracle.output_kind)  # noqa: E731
    n_base = min(budget // 4, len(X))
    base_rows = rng.choice(len(X), n_base, replace=False)  # random order: any prefix is a random sample
    base = score(X[base_rows])
    Xp = perturbed_rows(X, trigger, max(budget // 2 - n_base, 0), rng)
    pert = score(Xp) if len(Xp) else np.zeros((0, base.shape[1]))
    if tick is not None:
        tick(0.3, {"stage": "distilling", "queries_used": spent()})
    surrogate = distill(np.concatenate([X[base_rows], Xp]).astype(np.float32), np.concatenate([base, pert]), seed)
    thetas = []
    for i, lam in enumerate(lams):
        thetas.append(train_trigger(surrogate, trigger, X, y, groups, n_groups, criterion, lam, steps=steps,
                                    batch_size=min(batch_size, len(X)), lr=lr, adv_lr=adv_lr, fairness=fairness,
                                    seed=seed, n_classes=base.shape[1], weights=weights))
        if tick is not None:
            tick(0.3 + 0.5 * (i + 1) / len(lams), {"stage": "training on the surrogate", "lam": lam})
    m = min(n_base, (budget - spent()) // len(lams))
    rows = base_rows[:m]
    out = []
    for lam, theta in zip(lams, thetas, strict=True):
        with torch.no_grad():
            Xt = trigger.apply(torch.tensor(X[rows], dtype=torch.float32), theta.float()).numpy()
        out.append((lam, theta.numpy().astype(np.float64), score(Xt)))
    return rows, base[:m], out
