"""Small ONNX graphs built straight from numpy weights (opset 17, which onnx2torch converts).

Reference models and patch transforms are MLPs, tables and a few elementwise ops; writing their
graphs directly keeps exports deterministic (same weights -> same bytes -> same hash) and keeps
the exporter out of the dependency list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and constant initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def mlp(self, x: str, layers: Sequence[tuple[np.ndarray, np.ndarray]], output: str | None = None) -> str:
        """Linear layers (W as (in, out), b) with ReLU between them and none after the last."""
        h = x
        for i, (w, b) in enumerate(layers):
            last = i == len(layers) - 1
            h = self.op("Gemm", [h, self.const(w.astype(np.float32), "w"), self.const(b.astype(np.float32), "b")],
                        output if last else None)
            if not last:
                h = self.op("Relu", [h])
        return h

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
              name: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.inits, doc_string=doc)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fairpatch")
        m.ir_version = 8  # what onnxruntime releases back to 1.15 read
        onnx.checker.check_model(m)
        return m


def tensor(name: str, elem: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def float_tensor(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return tensor(name, TensorProto.FLOAT, shape)


def int_tensor(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return tensor(name, TensorProto.INT64, shape)


def mlp_model(layers: Sequence[tuple[np.ndarray, np.ndarray]], input_name: str = "input",
              output_name: str = "logits", name: str = "mlp", doc: str = "") -> bytes:
    """A whole MLP classifier: FP32 [N, d] in, [N, C] logits out."""
    b = GraphBuilder()
    b.mlp(input_name, layers, output_name)
    d, c = layers[0][0].shape[0], layers[-1][0].shape[1]
    m = b.model([float_tensor(input_name, ["N", d])], [float_tensor(output_name, ["N", c])], name, doc)
    return m.SerializeToString()
