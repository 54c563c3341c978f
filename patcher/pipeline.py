"""Scoring a patch on held-out rows exactly as the gateway serves it, before and after, through patcher.metrics.

One template for every caller (the job worker, the benches, benchmarks/): input transform -> the model (or the
patch's replacement model) -> output transform, with randomized decisions drawn from a request id so a score
can be reproduced. The model is any function from inputs to [N, C] log-probabilities (an oracle's
`log_probs`), so an HTTP upstream, an ONNX session and a budget-free copy of either all fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from patcher.apply import PatchRunner
from patcher.metrics import headline
from patcher.patch import Patch
from patcher.scores import to_log_probs

LogProbs = Callable[[np.ndarray], np.ndarray]  # model inputs [N, ...] -> log-probabilities [N, C]


def patched_decisions(runner: PatchRunner, model_log_probs: LogProbs | None, X: np.ndarray, groups: np.ndarray,
                      request_id: str | None, base_log_probs: np.ndarray | None = None) -> np.ndarray:
    """The patched decision of every row, as the gateway makes it. `base_log_probs`: the model's answer on X
    when the caller has it already (no input transform: the model is not asked again). `model_log_probs` may
    be None for a weight patch, which serves its own model."""
    seen = runner.transform_inputs(X)
    if runner.replaces_model:
        logp = to_log_probs(runner.model_logits(seen), "logits")
    elif seen is X and base_log_probs is not None:
        logp = base_log_probs
    elif model_log_probs is None:
        raise ValueError("this patch is applied to the model's output: pass the model (model_log_probs)")
    else:
        logp = model_log_probs(seen)  # a trigger changes what the model sees
    return runner.predict(seen, logp, groups if runner.needs_group else None, request_id=request_id)


@dataclass(frozen=True)
class Score:
    """Headline metrics on the held-out rows without and with the patch, and how the patch was served."""

    before: dict[str, float]
    after: dict[str, float]
    group_at_inference: bool
    served_by: str  # "patch" (a weight patch's replacement model) or "upstream"
    before_log_probs: np.ndarray  # the model's answer on the rows: callers need not ask it again
    after_decisions: np.ndarray


def score(patch: Patch | PatchRunner, model_log_probs: LogProbs, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
          *, seed: int, privileged: Any = None, request_id: str | None = None) -> Score:
    """Run the model alone and model + patch on (X, y, groups) and report both through patcher.metrics.headline
    (`privileged` adds AIF360's signed metrics). The held-out rows are scored as one request, id
    `request_id` (default "evaluation-{seed}"), so a randomized patch gives the same decisions every time."""
    runner = patch if isinstance(patch, PatchRunner) else PatchRunner(patch)
    logp = model_log_probs(X)
    rid = request_id if request_id is not None else f"evaluation-{seed}"
    after = patched_decisions(runner, model_log_probs, X, groups, rid, base_log_probs=logp)
    return Score(before=headline(y, logp.argmax(1), groups, privileged), after=headline(y, after, groups, privileged),
                 group_at_inference=runner.needs_group, served_by="patch" if runner.replaces_model else "upstream",
                 before_log_probs=logp, after_decisions=after)
