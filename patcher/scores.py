"""Model outputs in one shape: whatever a model returns, methods work on log-probabilities (N, C).

Models return one logit (binary), C logits, or C probabilities. Methods and patches convert once,
at the boundary, with `to_log_probs`, and patched outputs go back to the model's own kind with
`from_log_probs`, so a client sees the same kind of output it got before the patch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

OutputKind = Literal["logits", "probabilities"]
EPS = 1e-12  # the floor under probabilities before a log (also in exported graphs)


def log_softmax(z: np.ndarray) -> np.ndarray:
    # The ufuncs' reduce: `z.max`'s and `z.sum`'s own, without their Python wrappers (most of a few rows' cost).
    z = z - np.maximum.reduce(z, axis=1, keepdims=True)
    return z - np.log(np.add.reduce(np.exp(z), axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def to_log_probs(scores: np.ndarray, kind: OutputKind = "logits") -> np.ndarray:
    """(N,), (N, 1) or (N, C) model outputs -> (N, C) log-probabilities, C >= 2."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2:
        raise ValueError(f"model outputs must be (N,), (N, 1) or (N, C); got shape {s.shape}")
    if s.shape[1] == 1:  # one binary output: the logit or the probability of class 1
        if kind == "probabilities":
            p = np.clip(s, EPS, 1 - EPS)
            s = np.log(p / (1 - p))
        return np.hstack([-np.logaddexp(0.0, s), -np.logaddexp(0.0, -s)])  # log sigmoid(-z), log sigmoid(z)
    if kind == "probabilities":
        return np.log(np.clip(s / s.sum(axis=1, keepdims=True), EPS, None))
    return log_softmax(s)


def from_log_probs(logp: np.ndarray, kind: OutputKind, n_outputs: int) -> np.ndarray:
    """Inverse of `to_log_probs` up to the additive constant logits never pin down."""
    if n_outputs == 1:
        margin = logp[:, 1] - logp[:, 0]
        out = margin if kind == "logits" else 1.0 / (1.0 + np.exp(-margin))
        return out[:, None]
    return logp if kind == "logits" else softmax(logp)


def positive_margin(logp: np.ndarray) -> np.ndarray:
    """Binary decision score: log p(1) - log p(0); the decision is margin > threshold."""
    return logp[:, 1] - logp[:, 0]
