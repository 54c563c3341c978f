"""Model artifacts: a model version's own ONNX file, for methods that need gradients or weights.

`POST /v1/models/{m}/versions/{v}/artifact` takes the ONNX bytes as the raw body. They are checked
here before anything is stored: the bytes parse as an ONNX model that passes onnx's checker, its
default-domain opset is at most `MAX_OPSET` (onnx2torch, which turns it into a differentiable torch
module, reads no newer), it has exactly one floating-point input (the feature rows the upstream
takes too) and onnxruntime can build a session for it. The bytes go to Redis as they came (never
pickled), and their sha256 and signature are recorded in the version's spec (`ModelSpec.artifact`)
in the same transaction; the job worker checks the bytes against that hash before a method sees
them.
"""

from __future__ import annotations

import hashlib

from service.registry import ArtifactInfo

MAX_OPSET = 17  # the newest opset onnx2torch converts
ONNX_TYPES = frozenset({"application/octet-stream", "application/onnx", "application/x-onnx", ""})
_FLOAT_TYPES = {1: "FP32", 10: "FP16", 11: "FP64", 16: "BF16"}  # onnx.TensorProto element types


class ArtifactError(ValueError):
    """An upload that is not a usable ONNX model; the message says why (a 400)."""


def _dims(value_info) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in dims]


def inspect_onnx(data: bytes, max_opset: int = MAX_OPSET) -> ArtifactInfo:
    """Check the bytes are an ONNX model the methods can use and describe it. Blocking (onnx parsing and an
    onnxruntime session): run it in a thread."""
    import onnx
    import onnxruntime as ort
    from google.protobuf.message import DecodeError

    if not data:
        raise ArtifactError("empty body; send the model's ONNX bytes (Content-Type application/octet-stream)")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"not an ONNX model: the bytes do not parse as an ONNX ModelProto ({e})") from None
    if not model.graph.node and not model.graph.output:
        raise ArtifactError("not an ONNX model: the bytes parse, but hold no graph (is this an ONNX file?)")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None:
        raise ArtifactError("the model imports no default-domain (ai.onnx) opset")
    if opset > max_opset:
        raise ArtifactError(f"the model uses opset {opset}; gradient and weight access convert it with onnx2torch, "
                            f"which reads opset {max_opset} at most: export it with opset_version={max_opset}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"the ONNX model fails onnx's checker: {str(e).splitlines()[0]}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ArtifactError(f"the model must take one input (the feature rows); it takes {len(inputs)}: "
                            f"{[i.name for i in inputs]}")
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        raise ArtifactError(f"the model's input '{inputs[0].name}' must be a floating-point tensor "
                            f"(element type {onnx.TensorProto.DataType.Name(elem)})")
    if len(model.graph.output) < 1:
        raise ArtifactError("the model has no output")
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the message is what matters
        raise ArtifactError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None
    out = model.graph.output[0]
    return ArtifactInfo(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), opset=opset,
                        input_name=inputs[0].name, input_shape=_dims(inputs[0]), input_datatype=_FLOAT_TYPES[elem],
                        output_name=out.name, output_shape=_dims(out))


def upstream_conflict(info: ArtifactInfo, inputs: list[tuple[str, list[int]]], input_name: str | None) -> str | None:
    """Why the artifact cannot be the model behind the upstream, judged by its feature input (name, shape with -1
    for any size, from the upstream's V2 metadata); None when they fit."""
    named = [(n, s) for n, s in inputs if n == input_name] if input_name else inputs
    if len(named) != 1:
        return None  # the registration does not pin one input down; nothing to compare with
    name, shape = named[0]
    mine = [-1 if isinstance(d, str) else d for d in info.input_shape]
    fits = len(mine) == len(shape) and all(a < 0 or b < 0 or a == b for a, b in zip(mine, shape, strict=True))
    if fits:
        return None
    return (f"the artifact's input '{info.input_name}' has shape {mine}, but the upstream's input '{name}' has "
            f"shape {shape} (-1 = any size): it cannot be the model the upstream serves")


def verified(data: bytes | None, info: ArtifactInfo | None, what: str) -> bytes:
    """The stored bytes, checked against the hash recorded at upload; ValueError says what is wrong."""
    if info is None or data is None:
        raise ValueError(f"{what} has no ONNX artifact: upload it with POST /v1/models/{{m}}/versions/{{v}}/artifact")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ValueError(f"the stored artifact of {what} hashes to {digest[:12]}, not the recorded "
                         f"{info.sha256[:12]}: it was changed or corrupted; upload it again")
    return data
