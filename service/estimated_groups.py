"""A patch's attribute estimator, for live fairness of requests that do not carry their group.

An Eraser patch fitted with `bias=estimator` holds a linear attribute estimator q(a | x) = softmax(x W + b)
inside its output graph (patcher/methods/eraser.py: `Gemm(features[, columns], W, b)`). Its argmax is each
row's estimated group; live fairness counts such rows under `group_source: "estimated"`, never mixed with
groups the requests gave. The weights are read from the graph once per patch; a patch without an estimator
(or a graph of another shape) has none.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Estimator:
    W: np.ndarray  # [d, G]
    b: np.ndarray  # [G]
    columns: np.ndarray | None  # the feature columns it reads (None: all)
    names: tuple[str, ...]  # the patch's groups, in the estimator's order
    # The graph value that holds x W + b for the rows the graph saw (its Gemm's output, when that Gemm computes
    # exactly that: no attributes); None: there is none to reuse.
    output: str | None = None

    def groups(self, X: np.ndarray, kept: dict[str, np.ndarray | None] | None = None) -> list[str]:
        """Each row's most likely group. `kept`: values the output transform kept from its run over the same rows
        (PatchRunner.transform_outputs); the estimator's scores are taken from there rather than computed again."""
        scores = kept.get(self.output) if kept and self.output is not None else None
        if scores is None or len(scores) != len(X):
            x = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
            if self.columns is not None:
                x = x[:, self.columns]
            scores = x @ self.W + self.b
        return [self.names[i] for i in scores.argmax(axis=1).tolist()]


_cache: weakref.WeakKeyDictionary[Any, Estimator | None] = weakref.WeakKeyDictionary()


def estimator(runner: Any) -> Estimator | None:
    """The runner's attribute estimator, or None (cached per runner: the hot path asks every request)."""
    if runner is None:
        return None
    try:
        return _cache[runner]
    except KeyError:
        pass
    found = None
    patch = runner.patch
    if (patch.manifest.get("params") or {}).get("bias") == "estimator" and patch.part("output_transform"):
        try:
            found = _read(patch.part("output_transform"), tuple(patch.groups))
        except Exception:  # noqa: BLE001 - a graph not of the expected shape: no estimator, nothing estimated
            found = None
    _cache[runner] = found
    return found


def _read(graph_bytes: bytes, names: tuple[str, ...]) -> Estimator | None:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(graph_bytes).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) != 3:
            continue
        x, w, b = node.input
        columns = None
        if x != "features":
            gather = producers.get(x)
            if gather is None or gather.op_type != "Gather" or gather.input[0] != "features":
                continue
            columns = inits[gather.input[1]].astype(np.int64)
        W, bias = inits[w].astype(np.float32), inits[b].astype(np.float32)
        if W.ndim == 2 and W.shape[1] == len(names) and bias.shape == (len(names),):
            return Estimator(W, bias, columns, names, None if node.attribute else node.output[0])
    return None
