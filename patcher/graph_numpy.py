"""Small patch graphs evaluated with numpy instead of an onnxruntime session.

An output transform is a handful of elementwise ops and one or two tiny matrix products over [N, C]
(an Eraser patch: Gemm, Softmax, MatMul, Mul, Sub, Add). `InferenceSession.run` costs tens of
microseconds a call whatever the batch (feeds checked, outputs allocated, its allocator's memory
touched), more than the arithmetic; the same graph as numpy calls costs a fraction of that. Only the
plain float32 ops below are interpreted, with ONNX's semantics (multidirectional broadcasting, Gemm's
attributes, Softmax over one axis); a graph with any other op, attribute or type is left to
onnxruntime. The graph is the patch's own, verified bytes (patcher.patch); `compile_graph` also runs
it both ways on random inputs and keeps the numpy form only when the answers agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT64 = 7  # onnx.TensorProto.INT64


# The ufuncs' reduce rather than the array methods (`x.max`, `x.sum`: the same reduction behind a Python wrapper, whose
# cost is most of the call on a few rows).
_max, _sum = np.maximum.reduce, np.add.reduce


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - _max(x, axis=axis, keepdims=True))
    return e / _sum(e, axis=axis, keepdims=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - _max(x, axis=axis, keepdims=True)
    return z - np.log(_sum(np.exp(z), axis=axis, keepdims=True))


def _gemm(attrs: Mapping[str, Any]) -> Callable[..., np.ndarray] | None:
    alpha, beta = np.float32(attrs.get("alpha", 1.0)), np.float32(attrs.get("beta", 1.0))
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    if set(attrs) - {"alpha", "beta", "transA", "transB"}:
        return None

    def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        y = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if alpha != 1:
            y = y * alpha
        if c is not None:
            y = y + (c if beta == 1 else c * beta)
        return y

    return gemm


def _op(op: str, attrs: Mapping[str, Any], opset: int) -> Callable[..., np.ndarray] | None:
    """The numpy function for one node, or None where it is not interpreted here."""
    plain: dict[str, Callable[..., np.ndarray]] = {
        "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "MatMul": np.matmul,
        "Neg": np.negative, "Exp": np.exp, "Log": np.log, "Abs": np.abs, "Identity": lambda x: x,
        "Relu": lambda x: np.maximum(x, np.float32(0)),
        "Sigmoid": lambda x: np.float32(1) / (np.float32(1) + np.exp(-x)),
        "Max": lambda *xs: np.maximum.reduce(np.broadcast_arrays(*xs)) if len(xs) > 1 else xs[0],
        "Min": lambda *xs: np.minimum.reduce(np.broadcast_arrays(*xs)) if len(xs) > 1 else xs[0],
    }
    if op in plain:
        return None if attrs else plain[op]
    if op == "Gemm":
        return _gemm(attrs)
    if op in ("Softmax", "LogSoftmax"):
        if set(attrs) - {"axis"} or opset < 13:  # before 13 they flattened the input from `axis` on
            return None
        axis, fn = int(attrs.get("axis", -1)), _softmax if op == "Softmax" else _log_softmax
        return lambda x: fn(x, axis)
    if op == "Gather":
        if set(attrs) - {"axis"}:
            return None
        axis = int(attrs.get("axis", 0))
        return lambda x, i: np.take(x, i, axis=axis)
    return None


Input = tuple[str, int, list[int | None]]  # name, element type, dims (None: symbolic)


class NumpyGraph:
    """A graph as a list of numpy calls over named values; `run` answers like `InferenceSession.run(None, feeds)`."""

    def __init__(self, constants: dict[str, np.ndarray], steps: list[tuple[Callable[..., np.ndarray], list[str], str]],
                 outputs: list[str], inputs: list[Input]) -> None:
        self._constants, self._steps, self._outputs = constants, steps, outputs
        self._inputs = [(name, np.dtype(np.float32 if elem == _FLOAT else np.int64), dims)
                        for name, elem, dims in inputs]
        # The graph as a program over numbered slots, worked out once: a call then indexes a list rather than
        # building a dict of every value and looking each argument up by name.
        slots: dict[str, int] = {}
        for name in [*constants, *(name for name, _, _ in inputs), *(out for _, _, out in steps)]:
            slots.setdefault(name, len(slots))
        self._slots = slots
        self._initial: list[Any] = [None] * len(slots)
        for name, value in constants.items():
            self._initial[slots[name]] = value
        self._feeds = [(name, slots[name]) for name, _, _ in inputs]
        self._program = [(fn, tuple(slots[a] for a in args), slots[out]) for fn, args, out in steps]
        self._results = [slots[name] for name in outputs]

    def accepts(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether `feeds` are exactly the graph's inputs, of its types and shapes (onnxruntime refuses the rest, with
        its own error: such feeds go to it)."""
        if len(feeds) != len(self._inputs):
            return False
        for name, dtype, dims in self._inputs:
            x = feeds.get(name)
            if type(x) is not np.ndarray or x.dtype != dtype or x.ndim != len(dims):
                return False
            for want, got in zip(dims, x.shape, strict=True):
                if want is not None and want != got:
                    return False
        return True

    def run(self, feeds: Mapping[str, np.ndarray], keep: dict[str, Any] | None = None) -> list[np.ndarray]:
        """The graph's outputs; `keep`: names of values the caller wants as well (a dict, filled in)."""
        values = self._initial.copy()
        for name, slot in self._feeds:
            values[slot] = feeds[name]
        for fn, args, out in self._program:
            if len(args) == 2:
                values[out] = fn(values[args[0]], values[args[1]])
            elif len(args) == 1:
                values[out] = fn(values[args[0]])
            else:
                values[out] = fn(*[values[a] for a in args])
        if keep:
            for name in keep:
                slot = self._slots.get(name)
                keep[name] = None if slot is None else values[slot]
        return [values[slot] for slot in self._results]


def interpret(model: bytes) -> NumpyGraph | None:
    """The graph as numpy calls, or None when anything in it is not interpreted here."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model)
    graph = proto.graph
    if any(o.domain not in ("", "ai.onnx") for o in proto.opset_import) or graph.sparse_initializer:
        return None
    opset = max((o.version for o in proto.opset_import), default=0)
    constants = {}
    for t in graph.initializer:
        if t.data_type not in (_FLOAT, _INT64):
            return None
        constants[t.name] = numpy_helper.to_array(t)
    inputs = []
    for i in graph.input:
        if i.name in constants:
            continue
        tensor = i.type.tensor_type
        if tensor.elem_type not in (_FLOAT, _INT64) or not tensor.HasField("shape"):
            return None
        dims: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        inputs.append((i.name, tensor.elem_type, dims))
    steps = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or any(not n for n in node.input):
            return None
        fn = _op(node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, opset)
        if fn is None:
            return None
        steps.append((fn, list(node.input), node.output[0]))
    return NumpyGraph(constants, steps, [o.name for o in graph.output], inputs)


def compile_graph(model: bytes, session: Any, int_high: int = 2, seed: int = 0) -> NumpyGraph | None:
    """The numpy form of `model` when every op is interpreted here and it answers as `session` (onnxruntime, the
    same graph) does on random inputs (float32, to 1e-5); None otherwise. `int_high`: int64 inputs (group ids)
    are drawn from [0, int_high)."""
    try:
        graph = interpret(model)
    except Exception:  # noqa: BLE001 - a graph this reader does not follow: onnxruntime runs it
        return None
    if graph is None:
        return None
    rng = np.random.default_rng(seed)
    for n in (1, 7):
        feeds: dict[str, np.ndarray] = {}
        for name, dtype, dims in graph._inputs:
            shape = [n if d is None else d for d in dims]
            feeds[name] = rng.integers(0, max(int_high, 1), size=shape, dtype=np.int64) if dtype == np.int64 else \
                rng.normal(0.0, 2.0, size=shape).astype(np.float32)
        try:
            want = session.run(None, feeds)
            got = graph.run(feeds)
        except Exception:  # noqa: BLE001 - shapes this reader got wrong: onnxruntime runs it
            return None
        for w, g in zip(want, got, strict=True):
            g = np.asarray(g)
            if g.shape != w.shape or g.dtype != w.dtype or not np.allclose(g, w, rtol=1e-5, atol=1e-6):
                return None
    return graph
