"""Layer-wise optimisation (Savani et al., NeurIPS 2020, Algorithm 2) with a gradient-boosted-trees optimiser.

For each of the last `layers` parameter tensors in turn (the others fixed at their trained values),
a black-box optimiser searches every element of the tensor (or a random subset of `max_elements`)
in [w - 2.2 sigma, w + 2.2 sigma], sigma the tensor's standard deviation, for the most phi on the
tuning rows (threshold searched per call). The best single-tensor change wins; the unchanged model
with the threshold search is the floor.

The optimiser is a small Bayesian-optimisation loop in the manner of scikit-optimize's
`gbrt_minimize` (which the reference uses; scikit-optimize is no longer maintained, so it is not a
dependency): `initial_points` uniform random points, then each call fits three scikit-learn
GradientBoostingRegressor quantile models (16th, 50th, 84th percentiles) to the points seen so far
and evaluates the candidate with the highest expected improvement among `candidates` random points.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
from pydantic import Field

from patcher.access import ModelArtifact
from patcher.methods.contract import FitRequest, FitResult, Method
from patcher.methods.intra_common import BENCH, IntraOptions, finish, prepare, single_thread
from patcher.tuning import TuningData


class LayerwiseOptions(IntraOptions):
    layers: int = Field(5, ge=1, le=1000, description="how many of the last parameter tensors to optimise")
    calls: int = Field(20, ge=2, le=10_000, description="objective evaluations per tensor (gbrt n_calls)")
    initial_points: int = Field(10, ge=1, le=10_000, description="random evaluations before the trees guide")
    candidates: int = Field(2000, ge=10, le=100_000, description="random candidates scored by the acquisition")
    width: float = Field(2.2, gt=0, le=100, description="search box half-width, in standard deviations")
    max_elements: int = Field(100_000, ge=1, description="optimise at most this many elements of a tensor")
    xi: float = Field(0.01, ge=0, description="expected-improvement exploration margin")



def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float, xi: float) -> np.ndarray:
    """EI for minimisation, as scikit-optimize's gaussian_ei (sigma floored to avoid division by zero)."""
    from scipy.stats import norm

    sigma = np.maximum(sigma, 1e-9)
    z = (best - xi - mu) / sigma
    return (best - xi - mu) * norm.cdf(z) + sigma * norm.pdf(z)


def gbrt_minimize(func: Callable[[np.ndarray], float], lower: np.ndarray, upper: np.ndarray, calls: int,
                  initial_points: int, candidates: int, xi: float, rng: np.random.Generator,
                  on_call: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, float, list[float]]:
    """Minimise `func` over the box [lower, upper]; returns (best x, best value, every value in call order)."""
    from sklearn.ensemble import GradientBoostingRegressor

    dim = len(lower)
    xs: list[np.ndarray] = []
    ys: list[float] = []
    for i in range(calls):
        if i < min(initial_points, calls):
            x = rng.uniform(lower, upper)
        else:
            X, Y = np.asarray(xs), np.asarray(ys)
            cand = rng.uniform(lower, upper, size=(candidates, dim))
            if np.ptp(Y) == 0:  # a flat surface gives the trees nothing to split on: explore
                x = cand[0]
            else:
                seed = int(rng.integers(2**31))
                preds = [GradientBoostingRegressor(loss="quantile", alpha=q, n_estimators=30, max_depth=3,
                                                   learning_rate=0.1, min_samples_leaf=1, random_state=seed)
                         .fit(X, Y).predict(cand) for q in (0.16, 0.5, 0.84)]
                mu, sigma = preds[1], np.abs(preds[2] - preds[0]) / 2
                x = cand[int(np.argmax(expected_improvement(mu, sigma, float(Y.min()), xi)))]
        value = float(func(x))
        xs.append(x)
        ys.append(value)
        if on_call is not None:
            on_call(i, value)
    j = int(np.argmin(ys))
    return xs[j], ys[j], ys


def fit(access: ModelArtifact, data: TuningData, request: FitRequest, opts: LayerwiseOptions) -> FitResult:
    """Optimise the last `layers` parameter tensors one at a time for phi on `data`; keep the best one."""
    import torch

    with single_thread():
        ctx = prepare(access, data, request, opts)
        seed = request.seed
        rng = np.random.default_rng(seed)
        model = copy.deepcopy(ctx.module)
        named = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
        chosen = named[-opts.layers:]
        best_op, best_change, per_tensor = ctx.base, None, []
        total = len(chosen) * opts.calls
        for k, (name, param) in enumerate(chosen):
            original = param.detach().clone()
            flat = original.flatten()
            n = flat.numel()
            take = np.sort(rng.choice(n, size=min(n, opts.max_elements), replace=False))
            center = flat[take].double().cpu().numpy()
            sigma = float(flat.double().std(unbiased=False)) if n > 1 else abs(float(flat[0])) or 1.0
            lower, upper = center - opts.width * sigma, center + opts.width * sigma
            idx = torch.as_tensor(take, device=param.device)

            def set_values(x: np.ndarray, param=param, original=original, idx=idx) -> None:
                with torch.no_grad():
                    new = original.flatten().clone()
                    new[idx] = torch.as_tensor(x, dtype=new.dtype, device=new.device)
                    param.copy_(new.view_as(param))

            def objective(x: np.ndarray) -> float:
                set_values(x)
                return -ctx.evaluate(model).objective

            def on_call(i: int, value: float, k=k, name=name) -> None:
                done = k * opts.calls + i + 1
                ctx.progress(0.95 * done / total, {"stage": "layer-wise optimisation", "tensor": name,
                                                   "call": i + 1, "objective": -value})

            x_best, _, values = gbrt_minimize(objective, lower, upper, opts.calls, opts.initial_points,
                                              opts.candidates, opts.xi, rng, on_call)
            set_values(x_best)
            op = ctx.evaluate(model)
            per_tensor.append({"tensor": name, "elements": int(len(take)), "of": int(n), "sigma": sigma,
                               "objective": op.objective, "bias": op.bias,
                               "best_call": int(np.argmin(values)) + 1})
            if op.objective > best_op.objective:
                best_op, best_change = op, (name, x_best.copy(), take)
            with torch.no_grad():
                param.copy_(original)
        if best_change is not None:
            name, x, take = best_change
            param = dict(model.named_parameters())[name]
            with torch.no_grad():
                new = param.detach().flatten().clone()
                new[torch.as_tensor(take, device=new.device)] = torch.as_tensor(x, dtype=new.dtype, device=new.device)
                param.copy_(new.view_as(param))
        details = {"tensors": per_tensor, "chosen": None if best_change is None else best_change[0],
                   "calls": opts.calls, "seed": seed}
        return finish("layerwise", ctx, model, best_op, details)


METHOD = Method(
    name="layerwise",
    summary=("intra-processing (Savani et al. 2020): optimise the last layers' weights one tensor at a time "
             "by Bayesian optimisation of a bias-bounded objective"),
    access=("weights",), options=LayerwiseOptions, fit=fit, group_at_inference="none", bench=BENCH)
