"""Zero-hop serving: a model and its patch composed into one ONNX model, or a Triton ensemble.

`export_patched_model` does what the gateway does per request (service.infer.apply_patch and
service.patch_serving), inside one graph: the patch's input transform, the model (or, for a weight
patch, the replacement model), the model's scores to log-probabilities, the output transform, and the
patched log-scores back in the model's own kind, shape and dtype. The result keeps the model's input
and output names and shapes, so any ONNX server (onnxruntime, Triton, KServe, MLServer) serves the
patched model with no gateway in the path. The conversions run in float64 with the same float32
round trips as the gateway, so the answers agree to float32 rounding.

Extra inputs, only where the patch needs them:
- the group (named as the registration's `group_input`, default `group`): INT64 [N], each row's index
  into the patch's `groups` (recorded in the model's metadata as `fairpatch_groups`). The gateway also
  takes group names; an ONNX model takes the ids. Ids must lie in [0, G): onnxruntime refuses larger
  ones, but a negative id would index from the end, so check ids before sending them.
- `fairpatch_uniform`, FP32 [N], for patches with randomized decisions, and only when asked for
  (`uniform_input=True`): the gateway derives these U(0, 1) draws from the request id
  (patcher.apply.uniform_draws), which no ONNX graph can reproduce. Without the flag such patches are
  refused rather than exported as something that answers differently from the gateway.

`export_triton_repo` keeps the model a black box: the patch's parts become ONNX models of their own
and an ensemble wires input transform -> model -> output transform under the model's name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from patcher.onnx_graphs import OPSET, GraphBuilder, tensor
from patcher.patch import Patch, PatchError
from patcher.scores import EPS, OutputKind

UNIFORM_INPUT = "fairpatch_uniform"
_DOUBLE, _FLOAT = TensorProto.DOUBLE, TensorProto.FLOAT
Dims = list[int | str]


class ExportError(PatchError):
    """A patch or model that cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int  # onnx.TensorProto data type
    shape: Dims  # symbolic dimensions as strings

    def value_info(self, name: str | None = None) -> onnx.ValueInfoProto:
        return tensor(name or self.name, self.elem_type, self.shape)


def _dims(v: onnx.ValueInfoProto) -> Dims:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in v.type.tensor_type.shape.dim]


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    return TensorSpec(v.name, v.type.tensor_type.elem_type, _dims(v))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller feeds (initializers listed as inputs by old exporters are not)."""
    inits = {t.name for t in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


def _load(data: bytes, what: str) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ExportError(f"the {what} is not an ONNX model ({type(e).__name__}: {e})") from None


def _pick(specs: Sequence[TensorSpec], name: str | None, what: str) -> TensorSpec:
    if name is not None:
        found = [s for s in specs if s.name == name]
        if not found:
            raise ExportError(f"the model has no {what} '{name}' (it has {', '.join(s.name for s in specs)}); "
                              f"pass the model's own {what} name")
        return found[0]
    return specs[0]


# --- composition ----------------------------------------------------------------------------------------

def _default_opset(m: onnx.ModelProto) -> int:
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), OPSET)


def _at_opset(m: onnx.ModelProto, version: int, what: str) -> onnx.ModelProto:
    if _default_opset(m) == version:
        return m
    from onnx import version_converter

    try:
        return version_converter.convert_version(m, version)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ExportError(f"cannot bring the {what} from opset {_default_opset(m)} to {version} to compose it "
                          f"({e}); re-export the model at opset {OPSET}") from None


@dataclass
class _Step:
    model: onnx.ModelProto
    inputs: Mapping[str, str]  # the step's input -> the tensor of the composed graph that feeds it
    outputs: Mapping[str, str]  # the step's output -> the composed graph's tensor it becomes
    what: str


def _compose(steps: Sequence[_Step], inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
             name: str, doc: str, metadata: Mapping[str, str]) -> onnx.ModelProto:
    """One graph from several: each step's names get a prefix of their own (onnx.compose.add_prefix), so
    nothing collides, and Identity nodes wire the steps' inputs and outputs to the composed graph's tensors
    (onnxruntime folds them away)."""
    opset = max([OPSET, *(_default_opset(s.model) for s in steps)])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    functions: list[onnx.FunctionProto] = []
    opsets: dict[str, int] = {"": opset}
    ir_version = 8
    for i, step in enumerate(steps):
        m = onnx.compose.add_prefix(_at_opset(step.model, opset, step.what), f"s{i}/")
        missing = [v.name for v in graph_inputs(step.model) if v.name not in step.inputs]
        if missing:
            raise ExportError(f"the {step.what} needs inputs {missing} that the export cannot feed")
        nodes += [helper.make_node("Identity", [outer], [f"s{i}/{inner}"]) for inner, outer in step.inputs.items()]
        nodes += m.graph.node
        nodes += [helper.make_node("Identity", [f"s{i}/{inner}"], [outer]) for inner, outer in step.outputs.items()]
        inits += m.graph.initializer
        value_info += m.graph.value_info
        functions += m.functions
        ir_version = max(ir_version, m.ir_version)
        for o in m.opset_import:
            if o.domain not in ("", "ai.onnx"):
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    graph = helper.make_graph(nodes, name, list(inputs), list(outputs), inits, doc_string=doc,
                              value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="fairpatch", functions=functions)
    model.ir_version = ir_version
    helper.set_model_props(model, dict(metadata))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the composed model does not validate: {str(e).splitlines()[0]}") from None
    return model


# --- the gateway's score conversions, as graphs (patcher.scores in float64) ---------------------------------

def _to_log_probs_graph(scores: TensorSpec, kind: OutputKind) -> tuple[onnx.ModelProto, int]:
    """`scores` -> `log_probs` FP32 [N, C] as the gateway feeds them to an output transform (computed in float64,
    then float32), and `log_probs64` [N, C] in float64; returns (graph, C)."""
    if len(scores.shape) not in (1, 2):
        raise ExportError(f"the model's scores '{scores.name}' have shape {scores.shape}; a patch applies to [N], "
                          "[N, 1] or [N, C] scores")
    c = fixed_columns(scores)
    g = GraphBuilder()
    s = g.op("Cast", ["scores"], to=_DOUBLE)
    if len(scores.shape) == 1:
        s = g.op("Unsqueeze", [s, g.const(np.array([1], np.int64), "axis")])
    if c == 1:
        one = g.const(np.float64(1.0), "one")
        if kind == "probabilities":
            low, high = g.const(np.float64(EPS), "eps"), g.const(np.float64(1 - EPS), "one_minus_eps")
            p = g.op("Min", [g.op("Max", [s, low]), high])
            s = g.op("Log", [g.op("Div", [p, g.op("Sub", [one, p])])])

        def softplus(x: str) -> str:  # log(1 + e^x) without overflow, as numpy's logaddexp(0, x)
            return g.op("Add", [g.op("Relu", [x]), g.op("Log", [g.op("Add", [one, g.op("Exp", [
                g.op("Neg", [g.op("Abs", [x])])])])])])

        lp = g.op("Concat", [g.op("Neg", [softplus(s)]), g.op("Neg", [softplus(g.op("Neg", [s]))])], axis=1)
        width = 2
    elif kind == "probabilities":
        total = g.op("ReduceSum", [s, g.const(np.array([1], np.int64), "axis")], keepdims=1)
        lp = g.op("Log", [g.op("Max", [g.op("Div", [s, total]), g.const(np.float64(EPS), "eps")])])
        width = c
    else:
        lp = g.op("LogSoftmax", [s], axis=1)
        width = c
    g.op("Identity", [lp], "log_probs64")
    g.op("Cast", [lp], "log_probs", to=_FLOAT)
    out = [tensor("log_probs", _FLOAT, ["N", width]), tensor("log_probs64", _DOUBLE, ["N", width])]
    return g.model([scores.value_info("scores")], out, "to_log_probs"), width


def _from_log_probs_graph(width: int, input_elem: int, kind: OutputKind, out: TensorSpec) -> onnx.ModelProto:
    """`patched` [N, width] log-scores -> `scores` in the model's kind, shape and dtype (from_log_probs in
    float64, then the model's float dtype, float32 for anything else)."""
    g = GraphBuilder()
    elem = out.elem_type if out.elem_type in (_FLOAT, _DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16) else _FLOAT
    if out_columns(out) != 1 and kind == "logits" and elem == input_elem:
        # Log-probabilities as logits, in their own float type: the round trip through float64 is exact, and
        # onnxruntime would keep it as one float-to-float Cast more a request.
        g.op("Identity", ["patched"], "scores")
    else:
        lp = g.op("Cast", ["patched"], to=_DOUBLE)
        if out_columns(out) == 1:
            margin = g.op("Sub", [g.op("Gather", [lp, g.const(np.int64(1), "one")], axis=1),
                                  g.op("Gather", [lp, g.const(np.int64(0), "zero")], axis=1)])
            if kind == "probabilities":
                margin = g.op("Sigmoid", [margin])
            res = margin if len(out.shape) == 1 else \
                g.op("Unsqueeze", [margin, g.const(np.array([1], np.int64), "axis")])
        else:
            res = lp if kind == "logits" else g.op("Softmax", [lp], axis=1)
        g.op("Cast", [res], "scores", to=elem)
    return g.model([tensor("patched", input_elem, ["N", width])], [tensor("scores", elem, out.shape)],
                   "from_log_probs")


def out_columns(spec: TensorSpec) -> int | str:
    return 1 if len(spec.shape) == 1 else spec.shape[-1]


def fixed_columns(scores: TensorSpec) -> int:
    """The number of score columns, which a patch needs fixed."""
    c = out_columns(scores)
    if not isinstance(c, int) or c < 1:
        raise ExportError(f"the model's scores '{scores.name}' have no fixed number of columns (shape "
                          f"{scores.shape}); re-export the model with a fixed class dimension")
    return c


def _cast_graph(src: TensorSpec, elem: int, flatten: bool = False) -> onnx.ModelProto:
    """`x` -> `y` in another dtype; flattened to [N, -1] for an output transform's `features`."""
    g = GraphBuilder()
    y = g.op("Cast", ["x"], None if flatten else "y", to=elem)
    shape: Dims = src.shape
    if flatten:
        g.op("Reshape", [y, g.const(np.array([0, -1], np.int64), "shape")], "y")
        shape = ["N", "D"]
    return g.model([src.value_info("x")], [tensor("y", elem, shape)], "cast")


# --- the patch's parts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Parts:
    input_transform: onnx.ModelProto | None
    output_transform: onnx.ModelProto | None
    replacement: onnx.ModelProto | None
    needs_group: bool
    needs_uniform: bool


def _parts(patch: Patch, uniform_input: bool) -> _Parts:
    patch.verify()
    parts = {k: _load(patch.part(k), f"patch's {k.replace('_', ' ')}") if patch.part(k) else None
             for k in ("input_transform", "output_transform", "replacement_model")}
    out = parts["output_transform"]
    names = {v.name for v in graph_inputs(out)} if out is not None else set()
    unknown = names - {"features", "log_probs", "group", "uniform"}
    if unknown:
        raise ExportError(f"the patch's output transform takes inputs {sorted(unknown)} that the gateway never feeds")
    if "uniform" in names and not uniform_input:
        raise ExportError(
            f"patch {patch.id[:12]} ({patch.method}) makes randomized decisions: the gateway draws them from each "
            "request's id, which an ONNX model cannot reproduce, so no exported model answers as the gateway "
            f"does. Export with uniform_input (CLI: --uniform-input) to get an extra FP32 [N] input "
            f"'{UNIFORM_INPUT}' that takes the draws (patcher.apply.uniform_draws(request_id, N) gives the "
            "gateway's), or serve this patch through the gateway")
    return _Parts(parts["input_transform"], out, parts["replacement_model"], "group" in names, "uniform" in names)


def _extra_inputs(parts: _Parts, group_input: str, taken: set[str]) -> list[TensorSpec]:
    extra = []
    if parts.needs_group:
        extra.append(TensorSpec(group_input, TensorProto.INT64, ["N"]))
    if parts.needs_uniform:
        extra.append(TensorSpec(UNIFORM_INPUT, _FLOAT, ["N"]))
    clash = [e.name for e in extra if e.name in taken]
    if clash:
        raise ExportError(f"the model already has an input named {clash[0]!r}; choose another group input name")
    return extra


def _metadata(patch: Patch, parts: _Parts, group_input: str, kind: OutputKind) -> dict[str, str]:
    meta = {"fairpatch_patch": patch.id, "fairpatch_method": patch.method, "fairpatch_output_kind": kind}
    if parts.needs_group:
        meta["fairpatch_group_input"] = group_input
        meta["fairpatch_groups"] = json.dumps(patch.groups)
    if parts.needs_uniform:
        meta["fairpatch_uniform_input"] = UNIFORM_INPUT
    return meta


def _post_steps(parts: _Parts, scores_tensor: str, scores: TensorSpec, features_tensor: str | None,
                features: TensorSpec | None, kind_in: OutputKind, kind_out: OutputKind, out_spec: TensorSpec,
                result: str, group_input: str) -> list[_Step]:
    """Scores -> log-probs -> output transform -> scores in the model's kind (service.infer.apply_patch)."""
    to_lp, width = _to_log_probs_graph(scores, kind_in)
    steps = [_Step(to_lp, {"scores": scores_tensor}, {"log_probs": "fp/log_probs", "log_probs64": "fp/log_probs64"},
                   "score conversion")]
    patched, patched_elem, patched_width = "fp/log_probs64", _DOUBLE, width
    out = parts.output_transform
    if out is not None:
        feeds = {"log_probs": "fp/log_probs"}
        wanted = {v.name for v in graph_inputs(out)}
        if "features" in wanted:
            assert features_tensor is not None and features is not None
            feeds["features"] = features_tensor
            if features.elem_type != _FLOAT or len(features.shape) != 2:  # else already FP32 [N, D]
                steps.append(_Step(_cast_graph(features, _FLOAT, flatten=True), {"x": features_tensor},
                                   {"y": "fp/features"}, "feature flattening"))
                feeds["features"] = "fp/features"
        if "group" in wanted:
            feeds["group"] = group_input
        if "uniform" in wanted:
            feeds["uniform"] = UNIFORM_INPUT
        steps.append(_Step(out, feeds, {out.graph.output[0].name: "fp/patched"}, "patch's output transform"))
        patched, patched_elem = "fp/patched", _spec(out.graph.output[0]).elem_type
        last = _spec(out.graph.output[0]).shape
        patched_width = last[-1] if last and isinstance(last[-1], int) else width
    steps.append(_Step(_from_log_probs_graph(patched_width, patched_elem, kind_out, out_spec),
                       {"patched": patched}, {"scores": result}, "score conversion"))
    return steps


# --- one ONNX model ------------------------------------------------------------------------------------------

def export_patched_model(patch: Patch, model_onnx: bytes | None, *, output_kind: OutputKind = "logits",
                         input_name: str | None = None, output_name: str | None = None,
                         group_input: str = "group", uniform_input: bool = False) -> bytes:
    """The model and the patch as one ONNX model that answers what the gateway answers.

    `output_kind`, `input_name`, `output_name` and `group_input` are the model's registration (its scores'
    kind, its feature input and its scores output, when it has several; the group input's name). The
    result has the model's inputs and outputs, same names and shapes, plus the extra inputs described in
    the module docstring. A weight patch replaces the model: the result is its replacement model with the
    transforms and takes the model's names (`model_onnx` may be None; then the replacement's names).
    """
    parts = _parts(patch, uniform_input)
    if parts.replacement is not None:
        return _export_weight_patch(patch, parts, model_onnx, output_kind, input_name, output_name, group_input)
    if model_onnx is None:
        raise ExportError("this patch applies around the model: give the model's ONNX file to export them together")
    model = _load(model_onnx, "model")
    ins, outs = graph_inputs(model), graph_outputs(model)
    feat = _pick(ins, input_name, "input")
    if input_name is None and len(ins) > 1:
        raise ExportError(f"the model has inputs {', '.join(i.name for i in ins)}; say which one takes the features "
                          "(input_name, as in the registration)")
    scores = _pick(outs, output_name, "output")
    extra = _extra_inputs(parts, group_input, {i.name for i in ins})
    fixed_columns(scores)  # before anything is built
    steps: list[_Step] = []
    sent = feat.name
    if parts.input_transform is not None:  # as the gateway: float32 through the trigger, then the input's dtype
        it = parts.input_transform
        steps.append(_Step(_cast_graph(feat, _FLOAT), {"x": feat.name}, {"y": "fp/features32"}, "input cast"))
        steps.append(_Step(it, {graph_inputs(it)[0].name: "fp/features32"},
                           {it.graph.output[0].name: "fp/triggered"}, "patch's input transform"))
        triggered = TensorSpec("fp/triggered", _FLOAT, feat.shape)
        steps.append(_Step(_cast_graph(triggered, feat.elem_type), {"x": "fp/triggered"}, {"y": "fp/sent"},
                           "input cast"))
        sent = "fp/sent"
    model_out = {o.name: (f"fp/model/{o.name}" if o.name == scores.name else o.name) for o in outs}
    steps.append(_Step(model, {i.name: (sent if i.name == feat.name else i.name) for i in ins}, model_out, "model"))
    steps += _post_steps(parts, f"fp/model/{scores.name}", scores, sent,
                         TensorSpec(sent, feat.elem_type, feat.shape), output_kind, output_kind, scores,
                         scores.name, group_input)
    inputs = [i.value_info() for i in ins] + [e.value_info() for e in extra]
    outputs = [o.value_info() for o in outs]
    doc = (f"{model.graph.name or 'model'} with fairpatch patch {patch.id} ({patch.method}) composed in; answers "
           "as the fairpatch gateway does")
    composed = _compose(steps, inputs, outputs, model.graph.name or "patched", doc,
                        _metadata(patch, parts, group_input, output_kind))
    return composed.SerializeToString()


def _export_weight_patch(patch: Patch, parts: _Parts, model_onnx: bytes | None, output_kind: OutputKind,
                         input_name: str | None, output_name: str | None, group_input: str) -> bytes:
    """As service.patch_serving: input transform, replacement model, output transform, the registered kind."""
    rep = parts.replacement
    assert rep is not None
    rin, rout = graph_inputs(rep)[0], graph_outputs(rep)[0]
    if model_onnx is not None:  # the exported model answers under the model's names
        model = _load(model_onnx, "model")
        input_name = input_name or _pick(graph_inputs(model), None, "input").name
        output_name = output_name or _pick(graph_outputs(model), None, "output").name
    in_name, out_name = input_name or rin.name, output_name or rout.name
    feat = TensorSpec(in_name, _FLOAT, rin.shape)
    extra = _extra_inputs(parts, group_input, {in_name})
    steps: list[_Step] = []
    seen = in_name
    if parts.input_transform is not None:
        it = parts.input_transform
        steps.append(_Step(it, {graph_inputs(it)[0].name: in_name}, {it.graph.output[0].name: "fp/triggered"},
                           "patch's input transform"))
        seen = "fp/triggered"
    steps.append(_Step(rep, {rin.name: seen}, {rout.name: "fp/logits"}, "patch's replacement model"))
    width = fixed_columns(rout)
    out_spec = TensorSpec(out_name, _FLOAT, ["N", width])
    steps += _post_steps(parts, "fp/logits", TensorSpec("logits", rout.elem_type, rout.shape), seen,
                         TensorSpec(seen, _FLOAT, rin.shape), "logits", output_kind, out_spec, out_name,
                         group_input)
    inputs = [feat.value_info()] + [e.value_info() for e in extra]
    doc = f"fairpatch weight patch {patch.id} ({patch.method}); answers as the fairpatch gateway does"
    composed = _compose(steps, inputs, [out_spec.value_info()], "patched", doc,
                        _metadata(patch, parts, group_input, output_kind))
    return composed.SerializeToString()


# --- Triton ensemble -------------------------------------------------------------------------------------------

TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.DOUBLE: "TYPE_FP64", TensorProto.FLOAT16: "TYPE_FP16",
                TensorProto.BFLOAT16: "TYPE_BF16", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
                TensorProto.INT16: "TYPE_INT16", TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8",
                TensorProto.BOOL: "TYPE_BOOL", TensorProto.STRING: "TYPE_STRING"}
V2_TYPES = {"FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE, "FP16": TensorProto.FLOAT16,
            "BF16": TensorProto.BFLOAT16, "INT64": TensorProto.INT64, "INT32": TensorProto.INT32,
            "INT16": TensorProto.INT16, "INT8": TensorProto.INT8, "UINT8": TensorProto.UINT8,
            "BOOL": TensorProto.BOOL, "BYTES": TensorProto.STRING}


def v2_tensor_spec(meta: Mapping) -> TensorSpec:
    """A TensorSpec from an OIP V2 metadata entry ({"name", "datatype", "shape"}; -1 = any size)."""
    if meta.get("datatype") not in V2_TYPES:
        raise ExportError(f"tensor '{meta.get('name')}' has datatype {meta.get('datatype')!r}, which Triton does "
                          "not take")
    shape = [d if d >= 0 else ("N" if i == 0 else f"d{i}") for i, d in enumerate(meta.get("shape") or [])]
    return TensorSpec(meta["name"], V2_TYPES[meta["datatype"]], shape)


def _tensor_config(t: TensorSpec) -> str:
    if t.elem_type not in TRITON_TYPES:
        raise ExportError(f"tensor '{t.name}' has ONNX type {t.elem_type}, which Triton does not take")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape)
    return f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.elem_type]} dims: [ {dims} ] }}'


def _lines(items: Iterable[str]) -> str:
    return ",\n".join(items)


def _onnx_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
            f'input [\n{_lines(_tensor_config(t) for t in inputs)}\n]\n'
            f'output [\n{_lines(_tensor_config(t) for t in outputs)}\n]\n')


def _ensemble_step(model: str, version: int, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> str:
    maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    body = "\n".join(maps)
    return f'    {{\n      model_name: "{model}"\n      model_version: {version}\n{body}\n    }}'


def export_triton_repo(patch: Patch, repo: str | Path, *, model_name: str, model_version: str | None,
                       features: TensorSpec, scores: TensorSpec, output_kind: OutputKind = "logits",
                       group_input: str = "group", ensemble_name: str | None = None,
                       uniform_input: bool = False) -> list[Path]:
    """A Triton model repository in `repo`: the patch's parts as ONNX models and an ensemble that wires
    [input transform ->] the model (a black box Triton already serves as `model_name`, `model_version`;
    its feature input `features` and scores output `scores`) -> output transform. The ensemble is named
    `ensemble_name` (default `<model>_fairpatch`), takes the model's feature input plus the extra inputs
    of `export_patched_model` and answers the patched scores under the model's output name. Writes
    nothing into the model's own directory; returns the files written."""
    parts = _parts(patch, uniform_input)
    if parts.replacement is not None:
        raise ExportError("a weight patch replaces the model rather than wrapping it: export one ONNX model "
                          "(--out) and serve it in Triton as an onnxruntime model")
    if model_version is not None and not str(model_version).isdigit():
        raise ExportError(f"Triton model versions are integers; the model's version is {model_version!r}")
    fixed_columns(scores)  # before any file is written
    ens = ensemble_name or f"{model_name}_fairpatch"
    version = int(model_version) if model_version is not None else -1
    extra = _extra_inputs(parts, group_input, {features.name})
    meta = _metadata(patch, parts, group_input, output_kind)
    root = Path(repo)
    written: list[Path] = []

    def write(name: str, model: onnx.ModelProto, config: str) -> None:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        for path, data in ((root / name / "1" / "model.onnx", model.SerializeToString()),
                           (root / name / "config.pbtxt", config.encode())):
            path.write_bytes(data)
            written.append(path)

    steps: list[str] = []
    sent = features.name
    if parts.input_transform is not None:
        it = parts.input_transform
        name = f"{ens}_input"
        composed = _compose([_Step(_cast_graph(features, _FLOAT), {"x": features.name}, {"y": "fp/features32"},
                                   "input cast"),
                             _Step(it, {graph_inputs(it)[0].name: "fp/features32"},
                                   {it.graph.output[0].name: "fp/triggered"}, "patch's input transform"),
                             _Step(_cast_graph(TensorSpec("fp/triggered", _FLOAT, features.shape), features.elem_type),
                                   {"x": "fp/triggered"}, {"y": features.name + "_patched"}, "input cast")],
                            [features.value_info()], [features.value_info(features.name + "_patched")],
                            name, f"input transform of fairpatch patch {patch.id}", meta)
        out_t = TensorSpec(features.name + "_patched", features.elem_type, features.shape)
        write(name, composed, _onnx_config(name, [features], [out_t]))
        steps.append(_ensemble_step(name, -1, {features.name: features.name}, {out_t.name: "fairpatch_sent"}))
        sent = "fairpatch_sent"
    steps.append(_ensemble_step(model_name, version, {features.name: sent}, {scores.name: "fairpatch_model_scores"}))

    out_name = f"{ens}_output"
    raw = TensorSpec(scores.name, scores.elem_type, scores.shape)
    post = _post_steps(parts, scores.name, raw, features.name, features, output_kind, output_kind, scores,
                       scores.name + "_patched", group_input)
    used = {i for s in post for i in s.inputs.values()}
    post_inputs = [raw] + ([features] if features.name in used else []) + [e for e in extra if e.name in used]
    patched = TensorSpec(scores.name + "_patched", scores.elem_type, scores.shape)
    composed = _compose(post, [t.value_info() for t in post_inputs], [patched.value_info()], out_name,
                        f"output transform of fairpatch patch {patch.id}", meta)
    write(out_name, composed, _onnx_config(out_name, post_inputs, [patched]))
    feeds = {scores.name: "fairpatch_model_scores"}
    if features.name in used:
        feeds[features.name] = sent
    feeds.update({e.name: e.name for e in extra})
    steps.append(_ensemble_step(out_name, -1, feeds, {patched.name: scores.name}))

    config = (f'name: "{ens}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
              f'input [\n{_lines(_tensor_config(t) for t in [features, *extra])}\n]\n'
              f'output [\n{_tensor_config(scores)}\n]\n'
              f'ensemble_scheduling {{\n  step [\n{_lines(steps)}\n  ]\n}}\n')
    (root / ens / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version directory, even an empty one
    (root / ens / "config.pbtxt").write_text(config)
    written.append(root / ens / "config.pbtxt")
    return written
