"""Applying a patch: numpy and onnxruntime only (no torch), sessions built once per patch."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from patcher.graph_numpy import NumpyGraph, compile_graph
from patcher.patch import Patch, PatchError


def uniform_draws(request_id: str | None, n: int) -> np.ndarray:
    """n reproducible U(0, 1) draws for one request: the same id gives the same draws (replays and
    audits see the same randomized decisions); no id gives fresh draws."""
    if request_id is None:
        rng = np.random.default_rng()
    else:
        seed = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
    return rng.random(n, dtype=np.float32)


class UnknownGroupError(ValueError):
    """A group id or name at inference that the patch was not fitted for."""


def _session(data: bytes, device: str | None = "cpu"):
    import onnxruntime as ort

    from patcher.device import ort_session

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # patch graphs are tiny; threads cost more than they save
    return ort_session(data, opts, device)


def _run(graph: NumpyGraph | None, session, feeds: dict[str, np.ndarray],
         keep: dict[str, Any] | None = None) -> list[np.ndarray]:
    """A transform's outputs: by numpy where the graph has a numpy form and the feeds fit it, else by onnxruntime.
    `keep`: intermediate values wanted too, filled in by the numpy form (left as they are otherwise)."""
    if graph is not None and graph.accepts(feeds):
        return graph.run(feeds, keep)
    return session.run(None, feeds)


class PatchRunner:
    """Runs a patch's parts. Build once per patch (sessions are the expensive part), call per batch."""

    def __init__(self, patch: Patch, device: str | None = None) -> None:
        """`device` (patcher.device; None: FAIRPATCH_DEVICE, else auto) is where a weight patch's replacement
        model runs. The input and output transforms stay on the CPU: elementwise graphs on a batch, where a
        copy to the GPU and back costs more than the work."""
        patch.verify()
        self.patch = patch
        inp = patch.part("input_transform")
        self._input = _session(inp) if inp else None
        out = patch.part("output_transform")
        self._output = _session(out) if out else None
        # The transforms as numpy calls where they are plain enough (patcher.graph_numpy): a session's fixed cost
        # per call is most of a small batch's patch time. onnxruntime runs the rest.
        groups = max(len(patch.groups), 2)
        self._input_np: NumpyGraph | None = compile_graph(inp, self._input, groups) if inp else None
        self._output_np: NumpyGraph | None = compile_graph(out, self._output, groups) if out else None
        self._output_inputs = {i.name for i in self._output.get_inputs()} if self._output else set()
        self._group_index = {name: i for i, name in enumerate(patch.groups)}
        model = patch.part("replacement_model")
        self._model = _session(model, device) if model else None

    @property
    def model_device(self) -> str | None:
        """Where the replacement model runs (`cpu` or `cuda`); None without one."""
        from patcher.device import session_device

        return session_device(self._model) if self._model is not None else None

    @property
    def replaces_model(self) -> bool:
        """A weight patch: the patched model runs here, the upstream is not called."""
        return self._model is not None

    def model_logits(self, X: np.ndarray) -> np.ndarray:
        """The replacement model's [N, C] logits (weight patches only)."""
        if self._model is None:
            raise PatchError("this patch has no replacement model")
        name = self._model.get_inputs()[0].name
        return self._model.run(None, {name: np.asarray(X, dtype=np.float32)})[0]

    @property
    def needs_group(self) -> bool:
        return "group" in self._output_inputs

    def group_ids(self, groups: np.ndarray) -> np.ndarray:
        """Group names or ids -> int64 ids; anything the patch does not know is an error, never a default."""
        g = np.asarray(groups)
        if g.dtype.kind in "iu":
            ids = g.astype(np.int64)
            bad = (ids < 0) | (ids >= len(self._group_index))
            if bad.any():
                raise UnknownGroupError(f"unknown group id {int(ids[bad][0])}; this patch knows "
                                        f"{len(self._group_index)} groups: {list(self._group_index)}")
            return ids
        try:
            return np.fromiter((self._group_index[str(v)] for v in g), dtype=np.int64, count=len(g))
        except KeyError as e:
            raise UnknownGroupError(f"unknown group {e.args[0]!r}; this patch knows {list(self._group_index)}") \
                from None

    def transform_inputs(self, X: np.ndarray) -> np.ndarray:
        if self._input is None:
            return X
        feeds = {self._input.get_inputs()[0].name: X.astype(np.float32, copy=False)}
        return _run(self._input_np, self._input, feeds)[0]

    def transform_outputs(self, features: np.ndarray, log_probs: np.ndarray,
                          groups: np.ndarray | None = None, request_id: str | None = None,
                          keep: dict[str, Any] | None = None) -> np.ndarray:
        """Patched log-scores [N, C]; their argmax is the patched decision. `keep`: names of graph values the caller
        wants as well (a dict, filled in where the graph ran as numpy calls; else left as it is)."""
        if self._output is None:
            return log_probs
        feeds: dict[str, np.ndarray] = {}
        if "features" in self._output_inputs:
            feeds["features"] = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if "log_probs" in self._output_inputs:
            feeds["log_probs"] = np.asarray(log_probs, dtype=np.float32)
        if self.needs_group:
            if groups is None:
                raise PatchError("this patch needs the group of every row at inference")
            feeds["group"] = self.group_ids(groups)
        if "uniform" in self._output_inputs:
            feeds["uniform"] = uniform_draws(request_id, len(log_probs))
        return _run(self._output_np, self._output, feeds, keep)[0].astype(np.float64)

    def predict(self, features: np.ndarray, log_probs: np.ndarray, groups: np.ndarray | None = None,
                request_id: str | None = None) -> np.ndarray:
        return self.transform_outputs(features, log_probs, groups, request_id).argmax(axis=1)
