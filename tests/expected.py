"""Expected patched scores from a patch's own definition, for tests that check what the gateway serves.

The patch's ONNX parts run here directly with onnxruntime, and the score conversions are written out in
numpy, so a bug in patcher.apply, patcher.scores or the service cannot also be in the expectation (only the
reproducible draws of a randomized transform come from patcher.apply: they are the contract, not the math).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from patcher.apply import uniform_draws
from patcher.patch import Patch


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def run_part(patch: Patch, part: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The patch's ONNX `part` run on the `feeds` it declares (extra feeds are dropped)."""
    session = ort.InferenceSession(patch.part(part), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def seen_rows(patch: Patch, X: np.ndarray) -> np.ndarray:
    """The rows the model sees: through the patch's input transform when it has one."""
    if patch.part("input_transform") is None:
        return X
    (name,) = [i.name for i in ort.InferenceSession(patch.part("input_transform"),
                                                     providers=["CPUExecutionProvider"]).get_inputs()]
    return run_part(patch, "input_transform", {name: X.astype(np.float32)})


def patched_log_probs(patch: Patch, X: np.ndarray, logits: np.ndarray, groups=None,
                      request_id: str | None = None) -> np.ndarray:
    """[N, C] patched log-probabilities of rows `X` whose model logits are `logits` ([N, C], or [N] / [N, 1]
    for one binary logit)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1 or z.shape[1] == 1:  # one logit z: the classes' logits are 0 and z
        z = np.hstack([np.zeros((len(z), 1)), z.reshape(len(z), 1)])
    logp = log_softmax(z)
    if patch.part("output_transform") is None:
        return logp
    feeds = {"log_probs": logp.astype(np.float32), "features": np.asarray(X, np.float32).reshape(len(X), -1),
             "uniform": uniform_draws(request_id, len(X))}
    if groups is not None:
        g = np.asarray(groups)
        feeds["group"] = g.astype(np.int64) if g.dtype.kind in "iu" else \
            np.array([patch.groups.index(str(v)) for v in g], dtype=np.int64)
    return run_part(patch, "output_transform", feeds).astype(np.float64)


def patched_scores(patch: Patch, X: np.ndarray, logits: np.ndarray, groups=None,
                   request_id: str | None = None) -> np.ndarray:
    """What a logits model's caller gets back patched: C logits (log-probabilities are logits), or for one
    binary logit the patched margin log p(1) - log p(0)."""
    logp = patched_log_probs(patch, X, logits, groups, request_id)
    if np.ndim(logits) == 2 and np.shape(logits)[1] > 1:
        return logp.astype(np.float32)
    return (logp[:, 1] - logp[:, 0]).reshape(np.shape(logits)).astype(np.float32)
