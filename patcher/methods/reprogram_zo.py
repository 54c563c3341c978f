"""Trigger training from scores alone (zeroth order): randomized gradient estimates, every row counted.

Per step, on one minibatch of tuning rows (common random numbers: the same rows for every probe of
the step), `q` antithetic pairs of probes theta +/- mu * u_j, u_j uniform on the unit sphere:

    g^ = (dim / q) * sum_j [(L(theta + mu u_j) - L(theta - mu u_j)) / (2 mu)] u_j

costs 2 * q * batch rows. The trigger is low-dimensional (a few group-correlated columns for tabular
inputs, a coarse border grid or a 12-parameter color mix for images) because the estimate's variance
grows like dim / q. The utility and fairness parts of L are estimated from the same probes, so the
projected update of the gradient path works here too. A fixed evaluation subset of the tuning rows
scores the trigger now and then (and at the end); the best one seen is kept. Before every step the
remaining budget is checked so the run stops at the budget (leaving room for the last evaluation), never
past it.

Forms that start at random (an image frame) can begin with a random search: `restarts` starts scored
on one stratified batch of training rows (the same rows for all), the run descends from the best.
Their start is not the model itself, so the untouched model is scored on the evaluation rows too
(the accuracy cap refers to it).

A warm start (`start`, e.g. a tabular trigger that blends its columns toward their means, so the
group-correlated columns stop carrying the group before any query is spent) is a start that is not the
model either: the model is scored and kept as a candidate too (at the identity), so the selection can
always fall back on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from patcher.methods.reprogram_fairness import Criterion, Discriminator
from patcher.methods.reprogram_gradient import project
from patcher.methods.reprogram_triggers import Trigger
from patcher.metrics import decision_rates, rate_gap
from patcher.oracle import Oracle
from patcher.scores import to_log_probs


@dataclass
class ZOResult:
    eval_rows: np.ndarray  # indices of the tuning rows the evaluations scored
    base_log_probs: np.ndarray  # the untouched model's log-probabilities on them
    candidates: list[tuple[int, np.ndarray, np.ndarray]]  # (step, theta, log-probs on eval_rows) per evaluation
    steps: int
    history: list[dict] = field(default_factory=list)


def unit_directions(q: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.standard_normal((q, dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _mean_variance(p: np.ndarray, w: np.ndarray | None) -> float:
    """The estimated variance of the (weighted) mean of p."""
    if w is None:
        return float(p.var(ddof=1)) / len(p)
    m = np.average(p, weights=w)
    return float((w ** 2 * (p - m) ** 2).sum() / w.sum() ** 2 * len(p) / (len(p) - 1))


def numpy_gap(p: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, criterion: Criterion,
              unbiased: bool = False, weights: np.ndarray | None = None) -> float:
    """`gap_loss` in numpy: the squared rate gap (patcher.metrics) of the groups' mean P(class 1) per criterion
    cell, the means weighted by `weights` (a stratified batch weighed back to the population). On a small batch
    the plain square is biased upwards by var(p) / n per group, a term a trigger lowers by making its scores
    uniform within a cell (towards one class for all): `unbiased` subtracts the estimated variances of the two
    means."""
    if weights is None:
        r = decision_rates(p, y, groups, n_groups)
    else:
        r = {k: np.full(n_groups, np.nan) for k in ("sr", "tpr", "fpr")}
        for g in range(n_groups):
            for key, m in (("sr", groups == g), ("tpr", (groups == g) & (y == 1)), ("fpr", (groups == g) & (y == 0))):
                if m.any():
                    r[key][g] = np.average(p[m], weights=weights[m])
    cells = [("sr", np.ones(len(y), bool))] if criterion == "dp" else [("tpr", y == 1)] if criterion == "eopp" \
        else [("fpr", y == 0), ("tpr", y == 1)]
    total = 0.0
    for key, cell in cells:
        rates = r[key]
        if np.count_nonzero(~np.isnan(rates)) > 1:
            total += float(rate_gap(rates)) ** 2
            if unbiased:
                for g in (int(np.nanargmax(rates)), int(np.nanargmin(rates))):
                    m = cell & (groups == g)
                    if m.sum() > 1:
                        total -= _mean_variance(p[m], None if weights is None else weights[m])
    return total


def population_weights(cells: np.ndarray, batch_cells: np.ndarray) -> np.ndarray:
    """Per batch row: its (group, label) cell's share of `cells` over its share of the batch (mean 1 over the
    batch), so a stratified batch estimates population means (the selection rate of dp, the plain accuracy)."""
    ids, counts = np.unique(cells, return_counts=True)
    share = dict(zip(ids.tolist(), (counts / counts.sum()).tolist(), strict=True))
    b_ids, b_inverse, b_counts = np.unique(batch_cells, return_inverse=True, return_counts=True)
    w = np.array([share[c] for c in b_ids.tolist()]) / (b_counts / len(batch_cells))
    w = w[b_inverse]
    return w / w.mean()


def matched_decisions(margin: np.ndarray, rate: float, weights: np.ndarray | None, temperature: float) -> np.ndarray:
    """Soft decisions at the cut that accepts a `rate` share of the (weighted) rows: sigmoid((margin - cut) / (T s)),
    s the margins' spread, so that shrinking every margin does not make the decisions look alike either.
    The gap of these does not fall when every score moves the same way (the re-tuned threshold undoes that),
    unlike the gap of P(class 1), which a trigger can shrink by pushing every score towards class 0."""
    w = np.ones(len(margin)) if weights is None else weights
    order = np.argsort(margin)
    cum = np.cumsum(w[order]) / w.sum()
    cut = margin[order][min(int(np.searchsorted(cum, 1.0 - rate)), len(margin) - 1)]
    spread = np.sqrt(np.average((margin - np.average(margin, weights=w)) ** 2, weights=w)) + 1e-6
    return 1.0 / (1.0 + np.exp(-(margin - cut) / (temperature * spread)))


def stratified_batch(cells: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """About size / n_cells rows from every (group, label) cell, so every gap term has rows."""
    ids = np.unique(cells)
    per = max(size // len(ids), 1)
    return np.concatenate([rng.choice(np.flatnonzero(cells == c), size=min(per, int((cells == c).sum())),
                                      replace=False) for c in ids])


class ZOTrainer:
    def __init__(self, oracle: Oracle, trigger: Trigger, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                 n_groups: int, criterion: Criterion, lam: float, *, fairness: str, q: int, mu: float, lr: float,
                 batch_size: int, eval_size: int, evals: int, seed: int, n_classes: int,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None, restarts: int = 0,
                 restart_rows: int = 512, unbiased_gap: bool = False, subspace: int = 0,
                 start: np.ndarray | None = None, reweight: bool = False, matched: float = 0.0) -> None:
        """`holdout`: (training rows, selection rows): minibatches from the first, evaluations from the second.
        `start`: the parameters the search starts from instead of `trigger.init()`. `reweight`: the stratified
        batches are weighed back to the training rows' (group, label) shares in both losses (off: every cell
        counts the same). `matched` > 0 (binary): the gap is of `matched_decisions` at this temperature."""
        self.oracle, self.trigger = oracle, trigger
        self.X, self.y, self.groups = X, y, groups
        self.n_groups, self.criterion, self.lam, self.fairness = n_groups, criterion, lam, fairness
        self.q, self.mu, self.lr, self.batch_size = q, mu, lr, batch_size
        self.restarts = restarts if trigger.random_starts else 0
        self._restart_rows = restart_rows
        self.unbiased_gap = unbiased_gap
        self.reweight = reweight
        self.matched = matched
        self.subspace = min(subspace, trigger.dim)
        self.start = None if start is None else np.asarray(start, np.float64)
        self.rng = np.random.default_rng(seed)
        self.evals = evals  # evaluations of the trigger on the evaluation rows during the run
        train, pool = holdout if holdout is not None else (np.arange(len(X)), np.arange(len(X)))
        self.eval_rows = np.sort(self.rng.choice(pool, size=min(eval_size, len(pool)), replace=False))
        self.train_rows = train
        self.cells = (groups * (int(y.max()) + 1) + y)[train]
        torch.manual_seed(seed)
        self.disc = Discriminator(n_classes, n_groups, criterion) if fairness == "adversary" else None
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=1e-2) if self.disc is not None else None

    def log_probs(self, theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            Xt = self.trigger.apply(torch.tensor(self.X[rows], dtype=torch.float32), torch.tensor(theta).float())
        return to_log_probs(self.oracle.scores(Xt.numpy()), self.oracle.output_kind)

    def label_rate(self) -> float:
        return float(self.y[self.train_rows].mean())

    def weights(self, rows: np.ndarray) -> np.ndarray | None:
        """Population weights of a stratified batch of training rows (None: cells equal)."""
        if not self.reweight:
            return None
        k = int(self.y.max()) + 1
        return population_weights(self.cells, self.groups[rows] * k + self.y[rows])

    def losses(self, logp: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
        """(utility loss, fairness loss the trigger minimises) for scores on `rows`."""
        y, g = self.y[rows], self.groups[rows]
        w = self.weights(rows)
        ce = float(np.average(-logp[np.arange(len(rows)), y], weights=w))
        if self.disc is None:
            p = np.exp(logp[:, -1])
            if self.matched > 0 and logp.shape[1] == 2:
                p = matched_decisions(logp[:, -1] - logp[:, 0], self.label_rate(), w, self.matched)
            return ce, numpy_gap(p, y, g, self.n_groups, self.criterion, self.unbiased_gap, w)
        with torch.no_grad():
            adv = self.disc.loss(torch.tensor(logp, dtype=torch.float32), torch.tensor(y), torch.tensor(g))
        return ce, -float(adv)  # the trigger maximises the adversary's loss

    def train_disc(self, logps: list[np.ndarray], rows: np.ndarray) -> None:
        y, g = torch.tensor(self.y[rows]), torch.tensor(self.groups[rows])
        for logp in logps:
            self.disc_opt.zero_grad()
            self.disc.loss(torch.tensor(logp, dtype=torch.float32), y, g).backward()
            self.disc_opt.step()

    def starts_at_model(self) -> bool:
        """The search starts at the untouched model (its start's scores are the model's own)."""
        return self.start is None and self.trigger.identity_start

    def step_cost(self) -> int:
        return 2 * self.q * self.batch_size

    def restart_rows(self) -> int:
        return min(self._restart_rows, len(self.train_rows))

    def best_start(self, theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """The start among `restarts` (init plus random draws) with the least training loss on `rows`."""
        best, best_loss = theta, np.inf
        for k in range(self.restarts):
            cand = theta if k == 0 else self.trigger.random_start(self.rng).numpy().astype(np.float64)
            utility, fair = self.losses(self.log_probs(cand, rows), rows)
            if utility + self.lam * fair < best_loss:
                best, best_loss = cand, utility + self.lam * fair
        return best, best_loss

    def subspace_basis(self, dim: int) -> np.ndarray:
        """Identity (the full trigger), or `subspace` fixed random orthogonal directions scaled by
        sqrt(dim / k), so z ~ N(0, 1) moves each parameter about as much as the random start draws them."""
        if self.subspace <= 0 or self.subspace >= dim:
            return np.eye(dim)
        q, _ = np.linalg.qr(self.rng.standard_normal((dim, self.subspace)))
        return q * np.sqrt(dim / self.subspace)

    def run(self, budget: int, tick: Callable[[float, dict], None] | None = None) -> ZOResult:
        o = self.oracle
        start = o.queries_used
        spent = lambda: o.queries_used - start  # noqa: E731
        n_eval = len(self.eval_rows)
        identity = self.trigger.init().numpy().astype(np.float64)
        theta = identity if self.start is None else self.start.copy()
        if self.restarts > 1:
            theta, _ = self.best_start(theta, self.train_rows[stratified_batch(self.cells, self.restart_rows(),
                                                                                self.rng)])
        start_lp = self.log_probs(theta, self.eval_rows)
        base = start_lp if self.starts_at_model() else \
            to_log_probs(o.scores(self.X[self.eval_rows]), o.output_kind)  # the model's own scores
        candidates = [(0, theta.copy(), start_lp)]
        history = [{"step": 0, "queries": spent()}]
        if self.start is not None and self.trigger.identity_start:  # warm start: the model is a candidate too
            candidates.insert(0, (0, identity, base))
            history.insert(0, {"step": 0, "queries": spent(), "start": "model"})
        origin, basis = theta.copy(), self.subspace_basis(len(theta))
        z = np.zeros(basis.shape[1])  # the search runs on theta = origin + basis @ z
        theta_of = lambda z: origin + basis @ z  # noqa: E731
        train_budget = budget - spent() - n_eval * self.evals
        steps_total = max(train_budget // self.step_cost(), 0)
        eval_at = set(np.linspace(0, steps_total, self.evals + 1).astype(int)[1:].tolist())
        m = np.zeros_like(z)
        v = np.zeros_like(z)
        step = 0
        while step < steps_total and budget - spent() >= self.step_cost() + n_eval:
            rows = self.train_rows[stratified_batch(self.cells, self.batch_size, self.rng)]
            u = unit_directions(self.q, len(z), self.rng)
            diffs_u, diffs_f, seen = [], [], []
            for uj in u:
                lp_plus = self.log_probs(theta_of(z + self.mu * uj), rows)
                lp_minus = self.log_probs(theta_of(z - self.mu * uj), rows)
                (cu_p, cf_p), (cu_m, cf_m) = self.losses(lp_plus, rows), self.losses(lp_minus, rows)
                diffs_u.append((cu_p - cu_m) / (2 * self.mu))
                diffs_f.append((cf_p - cf_m) / (2 * self.mu))
                seen += [lp_plus, lp_minus]
            scale = len(z) / self.q
            g_u = scale * (np.array(diffs_u) @ u)
            g_f = scale * (np.array(diffs_f) @ u)
            if self.disc is not None:  # g_f estimates -grad(adversary loss): project as with gradients
                grad = project(torch.tensor(g_u), torch.tensor(-g_f), self.lam).numpy()
                self.train_disc(seen, rows)
            else:
                grad = g_u + self.lam * g_f
            step += 1  # Adam on the estimate
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad ** 2
            z = z - self.lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
            theta = theta_of(z)
            if step in eval_at:
                candidates.append((step, theta.copy(), self.log_probs(theta, self.eval_rows)))
                history.append({"step": step, "queries": spent()})
            if tick is not None:
                tick(step / max(steps_total, 1), {"step": step, "queries_used": spent()})
        if candidates[-1][0] != step:  # stopped early (budget): the last trigger is a candidate too
            candidates.append((step, theta.copy(), self.log_probs(theta, self.eval_rows)))
            history.append({"step": step, "queries": spent()})
        return ZOResult(self.eval_rows, base, candidates, step, history)
