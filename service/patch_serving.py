"""Serving a weight patch: the gateway runs the patch's replacement model itself, the upstream is not called.

A weight patch (intra-processing, FORML) carries the debiased model as ONNX (`replacement_model`,
patcher/patch.py). While it is the active patch of a model version, inference for that version runs
here with onnxruntime: the patch's input transform, the replacement model, its output transform,
then the scores in the model's registered output kind. The feature input is the one the version is
registered with (`upstream.input_name`, else the request's only non-group input) and is checked
against the replacement model's own signature, so a wrong shape is the client's 400. The scores
output is named as registered (`upstream.output_name`), else as the replacement model names it, and
is [N, C] (C = the replacement's logits). Responses say `fairpatch-served-by: patch` (the upstream's
say `upstream`). Deactivating the patch sends requests back to the upstream.

The replacement models are small MLPs: one call is tens of microseconds per batch, so it runs inline
on the event loop like the other patch graphs. The transforms around it are service.infer's template,
the same as for an upstream.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from patcher.apply import PatchRunner
from service.errors import ApiError
from service.oip import InvalidRequest, RequestInput, to_numpy
from service.registry import ModelSpec

SERVED_BY_HEADER = "fairpatch-served-by"
SERVED_BY_PATCH = "patch"
SERVED_BY_UPSTREAM = "upstream"


@dataclass(frozen=True)
class Signature:
    input_name: str
    input_shape: list[int | str]  # symbolic dimensions as strings
    output_name: str
    n_classes: int | str


_signatures: weakref.WeakKeyDictionary[PatchRunner, Signature] = weakref.WeakKeyDictionary()


def signature(runner: PatchRunner) -> Signature:
    """The replacement model's input and output, read once per runner."""
    sig = _signatures.get(runner)
    if sig is None:
        import onnx

        graph = onnx.load_from_string(runner.patch.part("replacement_model")).graph
        initializers = {t.name for t in graph.initializer}
        inp = next(i for i in graph.input if i.name not in initializers)
        out = graph.output[0]

        def dims(v: Any) -> list[int | str]:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N")
                    for d in v.type.tensor_type.shape.dim]

        out_dims = dims(out)
        sig = _signatures[runner] = Signature(inp.name, dims(inp), out.name, out_dims[-1] if out_dims else "C")
    return sig


def output_name(spec: ModelSpec, runner: PatchRunner) -> str:
    return spec.upstream.output_name or signature(runner).output_name


def input_name(spec: ModelSpec, runner: PatchRunner) -> str:
    return spec.upstream.input_name or signature(runner).input_name


def metadata(spec: ModelSpec, runner: PatchRunner) -> dict[str, Any]:
    """V2 model metadata while a weight patch serves the version: the replacement model's signature."""
    sig = signature(runner)
    batch = [-1 if isinstance(d, str) else d for d in sig.input_shape]
    classes = -1 if isinstance(sig.n_classes, str) else sig.n_classes
    return {"name": spec.name, "versions": [spec.version], "platform": "onnxruntime (fairpatch weight patch)",
            "inputs": [{"name": input_name(spec, runner), "datatype": "FP32", "shape": batch}],
            "outputs": [{"name": output_name(spec, runner), "datatype": "FP32", "shape": [-1, classes]}]}


def features(spec: ModelSpec, runner: PatchRunner, inputs: list[RequestInput]) -> np.ndarray:
    """The feature rows of a V2 request, checked against the replacement model's input."""
    name = spec.upstream.input_name
    if name is not None:
        found = [t for t in inputs if t.name == name]
        if not found:
            raise InvalidRequest(f"no input '{name}': model '{spec.name}' takes its features as '{name}' (plus "
                                 f"'{spec.group_input}')")
        tensor = found[0]
    elif len(inputs) == 1:
        tensor = inputs[0]
    else:
        raise InvalidRequest(f"model '{spec.name}' takes one feature input (plus '{spec.group_input}'); "
                             f"got {', '.join(t.name for t in inputs)}")
    X = to_numpy(tensor)
    if X.dtype.kind not in "fiub" or X.ndim == 0:
        raise InvalidRequest(f"input '{tensor.name}' must be a numeric tensor of rows, [N, ...]")
    check_shape(spec, runner, X)
    return X


def check_shape(spec: ModelSpec, runner: PatchRunner, X: np.ndarray) -> None:
    want = signature(runner).input_shape
    ok = X.ndim == len(want) and all(isinstance(w, str) or w == n for w, n in zip(want, X.shape, strict=True))
    if not ok:
        shown = [-1 if isinstance(w, str) else w for w in want]
        raise InvalidRequest(f"input has shape {list(X.shape)}; model '{spec.name}' expects {shown} (-1 = any "
                             "size)")


def logits(runner: PatchRunner, spec: ModelSpec, X: np.ndarray) -> np.ndarray:
    """The replacement model's logits [N, C] for rows that went through the patch's input transform."""
    if not len(X):  # onnxruntime is not asked about an empty batch
        classes = signature(runner).n_classes
        return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
    try:
        return np.asarray(runner.model_logits(X), dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - onnxruntime: the input does not fit the replacement model
        raise ApiError(500, f"the active weight patch {runner.patch.id[:12]} cannot run for model '{spec.name}' "
                            f"version '{spec.version}' ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                            "deactivate it") from None
