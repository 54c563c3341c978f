"""Black-box access to a model: send rows, read scores, and pay for every row.

`Oracle` is the protocol methods depend on. `CountingOracle` holds what every implementation
shares: the budget (refused before anything is sent), batching, and a cache so a row already paid
for is never paid for twice. `OnnxOracle` runs a local ONNX model; the gateway's `HttpOracle` runs
over the upstream endpoint. Gradient access is a separate, explicit interface, never assumed here.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from patcher.scores import OutputKind, to_log_probs


class BudgetExceeded(RuntimeError):
    """Raised before a call that would pass the query budget; nothing is sent."""


@runtime_checkable
class Oracle(Protocol):
    output_kind: OutputKind

    @property
    def queries_used(self) -> int: ...

    @property
    def budget(self) -> int | None: ...

    def scores(self, X: np.ndarray) -> np.ndarray: ...


class CountingOracle(ABC):
    """Budget, batching and a paid-row cache around `_score_batch`. `before_batch(rows)`, when set, is called
    before every batch is sent (a caller counts rows or stops a fit by raising)."""

    def __init__(self, budget: int | None = None, *, batch_size: int = 4096, cache: bool = True,
                 output_kind: OutputKind = "logits") -> None:
        if budget is not None and budget < 0:
            raise ValueError("budget must be >= 0 (or None for unlimited)")
        self._budget = budget
        self._used = 0
        self.batch_size = batch_size
        self.output_kind: OutputKind = output_kind
        self._cache: dict[bytes, np.ndarray] | None = {} if cache else None
        self.before_batch: Callable[[int], None] | None = None

    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def budget(self) -> int | None:
        return self._budget

    @property
    def remaining(self) -> int | None:
        return None if self._budget is None else self._budget - self._used

    @abstractmethod
    def _score_batch(self, X: np.ndarray) -> np.ndarray:
        """Raw model outputs for one batch, (n, C) or (n,)."""

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Raw outputs for every row of X; rows already paid for are served from the cache."""
        X = np.asarray(X)
        if len(X) == 0:
            raise ValueError("no rows to score")
        keys = [hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16).digest() for r in X] \
            if self._cache is not None else None
        if keys is None:
            todo = np.arange(len(X))
        else:
            first: dict[bytes, int] = {}
            for i, k in enumerate(keys):
                if k not in self._cache and k not in first:
                    first[k] = i
            todo = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        if self._budget is not None and self._used + len(todo) > self._budget:
            raise BudgetExceeded(
                f"scoring {len(todo)} new rows would use {self._used + len(todo)} queries, over the "
                f"budget of {self._budget} ({self.remaining} left); send fewer rows or raise the budget")
        fresh = [self._send(X[todo[i:i + self.batch_size]]) for i in range(0, len(todo), self.batch_size)]
        self._used += len(todo)
        if keys is None:
            return np.concatenate(fresh)
        if fresh:
            out = np.concatenate(fresh)
            for j, i in enumerate(todo):
                self._cache[keys[i]] = out[j]
        return np.stack([self._cache[k] for k in keys])

    def _send(self, batch: np.ndarray) -> np.ndarray:
        if self.before_batch is not None:
            self.before_batch(len(batch))
        return self._score_batch(batch)

    def log_probs(self, X: np.ndarray) -> np.ndarray:
        """Scores as (N, C) log-probabilities, whatever the model's output kind."""
        return to_log_probs(self.scores(X), self.output_kind)


class OnnxOracle(CountingOracle):
    """A local ONNX model as a black box (the demo's and the tests' stand-in for an endpoint)."""

    def __init__(self, model: str | Path | bytes, budget: int | None = None, *, input_name: str | None = None,
                 output_name: str | None = None, output_kind: OutputKind = "logits", device: str | None = None,
                 **kwargs) -> None:
        import onnxruntime as ort

        from patcher.device import ort_session

        super().__init__(budget, output_kind=output_kind, **kwargs)
        source = model if isinstance(model, bytes) else str(model)
        opts = ort.SessionOptions()
        # Idle intra-op threads must not busy-wait: between batches they would burn the cores that the rest of
        # a job (torch, the patch fit) or a server beside it needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort_session(source, opts, device)  # device: patcher.device (None: FAIRPATCH_DEVICE/auto)
        self.input_name = input_name or self._session.get_inputs()[0].name
        self.output_name = output_name or self._session.get_outputs()[0].name

    def _score_batch(self, X: np.ndarray) -> np.ndarray:
        return self._session.run([self.output_name], {self.input_name: X.astype(np.float32, copy=False)})[0]
