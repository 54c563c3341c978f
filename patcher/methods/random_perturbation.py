"""Random perturbation (Savani et al., NeurIPS 2020, Algorithm 1): the cheapest intra-processing debiaser.

T times, multiply every parameter element-wise by (1 + stddev * N(0, 1)), pick the threshold that
maximises phi on the tuning rows, and keep the best trial with its threshold. The unperturbed model
(with the threshold search) is trial 0, so the patch is never worse than re-thresholding alone on
the tuning rows. Needs the weights; sends no queries.
"""

from __future__ import annotations

import copy

from pydantic import Field

from patcher.access import ModelArtifact
from patcher.methods.contract import FitRequest, FitResult, Method
from patcher.methods.intra_common import BENCH, IntraOptions, finish, prepare, single_thread
from patcher.tuning import TuningData


class RandomPerturbationOptions(IntraOptions):
    trials: int = Field(101, ge=1, le=100_000, description="perturbed copies to try (T)")
    stddev: float = Field(0.1, gt=0, le=10, description="relative size of the multiplicative noise")



def fit(access: ModelArtifact, data: TuningData, request: FitRequest, opts: RandomPerturbationOptions) -> FitResult:
    """Best of `trials` randomly perturbed copies of the model by phi on `data` (no queries)."""
    import torch

    with single_thread():
        ctx = prepare(access, data, request, opts)
        seed = request.seed
        gen = torch.Generator().manual_seed(seed)
        base_state = copy.deepcopy(ctx.module.state_dict())
        trial_model = copy.deepcopy(ctx.module)
        best_op, best_state, best_trial = ctx.base, base_state, 0
        objectives = [ctx.base.objective]
        for t in range(1, opts.trials + 1):
            trial_model.load_state_dict(base_state)
            with torch.no_grad():
                for p in trial_model.parameters():
                    # drawn on the CPU: the same seed perturbs alike on every device
                    p.mul_(1 + opts.stddev * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
            op = ctx.evaluate(trial_model)
            objectives.append(op.objective)
            if op.objective > best_op.objective:
                best_op, best_state, best_trial = op, copy.deepcopy(trial_model.state_dict()), t
            if t % 10 == 0 or t == opts.trials:
                ctx.progress(0.95 * t / opts.trials, {"stage": "perturbing", "trial": t,
                                                      "best_objective": best_op.objective})
        trial_model.load_state_dict(best_state)
        details = {"trials": opts.trials, "stddev": opts.stddev, "best_trial": best_trial, "seed": seed,
                   "objectives": [round(o, 5) for o in objectives]}
        return finish("random_perturbation", ctx, trial_model, best_op, details)


METHOD = Method(
    name="random_perturbation",
    summary=("intra-processing (Savani et al. 2020): the best of many randomly perturbed copies of the "
             "weights, by a bias-bounded objective"),
    access=("weights",), options=RandomPerturbationOptions, fit=fit, group_at_inference="none", bench=BENCH)
