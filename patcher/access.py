"""Weight access to a model: its ONNX artifact, as bytes, as a torch module, and back to ONNX.

Query-only methods get an `Oracle`; methods that need gradients or weights (triggers with gradient
access, intra-processing, FORML) get a `ModelArtifact`. The artifact is always ONNX bytes verified
by sha256, never a pickle; torch is imported only when a method asks for the module.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from patcher.oracle import OnnxOracle

ACCESS_KINDS = ("queries", "zeroth_order", "gradient", "weights")


@dataclass(frozen=True)
class ModelArtifact:
    onnx_bytes: bytes
    name: str = "model"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    def oracle(self, budget: int | None = None, device: str | None = None) -> OnnxOracle:
        """Scores through onnxruntime on `device` (patcher.device), counted like any other oracle."""
        from patcher.oracle import OnnxOracle

        return OnnxOracle(self.onnx_bytes, budget=budget, device=device)

    def torch_module(self) -> torch.nn.Module:
        """A differentiable copy (onnx2torch; opset <= 17), in eval mode. Each call gives a fresh copy."""
        import onnx
        from onnx2torch import convert

        return convert(onnx.load_from_string(self.onnx_bytes)).eval()

    def input_shape(self) -> list[int | str]:
        """The first input's shape with symbolic dimensions as strings (e.g. ['N', 104])."""
        import onnx

        graph = onnx.load_from_string(self.onnx_bytes).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in dims]


def torch_to_onnx(module: torch.nn.Module, sample: torch.Tensor, *, input_name: str = "input",
                  output_name: str = "logits", opset: int = 17) -> bytes:
    """Export a module taking one [N, ...] tensor to ONNX with a dynamic batch axis.

    Uses the TorchScript exporter (no onnxscript dependency); opset 17 so onnx2torch can read it back.
    """
    import torch

    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, (sample,), buf, input_names=[input_name], output_names=[output_name],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
    return buf.getvalue()


def describe(access: Any) -> str:
    """A short name of an access object for reports."""
    return "weights" if isinstance(access, ModelArtifact) else "queries"
