"""What the upstream is, read before it is relied on: at registration and by `fairpatch models check`.

Real model servers differ from the gateway's own upstream in ways that silently break patching
(MLServer's sklearn runtime declares no tensors and answers hard labels unless asked for another
output; not every server has the binary tensor extension). So registration reads the server's
metadata (`GET /v2`: its extensions) and the model's (`GET /v2/models/{m}`), fills in what the model
does not declare from the registration, resolves `binary_data: auto`, and refuses an output the model
declares as integers (hard labels). Registration sends no inference request (a production model's
traffic, and tests that count it, see none); `models check` probes one row of zeros where the feature
width is declared, or a dataset's first rows, to see the output kind. A registration that cannot work
is refused (400) with the fix in the message; one the gateway cannot check (the upstream does not
answer) is kept, with a note that says so. The output-kind rules are also applied to the first scores
a job's oracle sees, so a job on hard labels or a mislabelled kind fails with the fix.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic_core

from service import binary_tensors
from service.errors import ApiError
from service.oip import ModelMetadata
from service.registry import Discovery, ModelSpec
from service.upstream import (
    UpstreamClient,
    UpstreamError,
    complete_metadata,
    decode_metadata,
    upstream_model_name,
    v2_model_url,
)

Kind = Literal["logits", "probabilities", "labels"]
PROBE_TIMEOUT_S = 5.0  # registration waits at most this long for each of its few upstream calls
INTEGER_TYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})


def output_kind_of(scores: np.ndarray) -> Kind:
    """What a batch of scores looks like: integers (hard labels), rows in [0, 1] summing to 1 or a single column
    in [0, 1] (probabilities), else logits."""
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(len(s), -1) if s.ndim != 2 else s
    if s.size and np.all(s == np.round(s)) and (s.shape[1] == 1 or np.all((s == 0) | (s == 1))):
        return "labels"  # class ids, or one-hot rows: nothing a patch on scores can move
    if s.size and np.all((s >= 0) & (s <= 1)) and (s.shape[1] == 1 or np.allclose(s.sum(axis=1), 1, atol=1e-3)):
        return "probabilities"
    return "logits"


def labels_message(spec: ModelSpec) -> str:
    up = spec.upstream
    output = f"output '{up.output_name}'" if up.output_name else "its default output"
    if up.protocol != "v2":  # one output, chosen by the server: the fix is on its side
        fix = {"mlflow": "serve the model's probabilities instead (a scikit-learn model logged with "
                         "pyfunc_predict_fn='predict_proba')",
               "v1": "serve the model's probabilities instead (a KServe predictor whose predict returns "
                     "predict_proba)"}[up.protocol]
        return (f"model '{spec.name}': upstream {up.url} answers hard labels (whole numbers); a patch cannot "
                f"change a label: {fix}, and register its upstream.output_kind")
    return (f"model '{spec.name}': upstream {up.url} answers hard labels (whole numbers) in {output}; a patch "
            "cannot change a label. Register the model's probability or logit output as upstream.output_name "
            "(MLServer / scikit-learn: predict_proba) and its upstream.output_kind")


def kind_problem(spec: ModelSpec, seen: Kind, columns: int) -> str | None:
    """Why the registration's output kind does not fit what the upstream answered, with the fix; None when it
    does (a single column in [0, 1] may be a logit too, so it is never called wrong for a logits registration)."""
    up = spec.upstream
    output = f"output '{up.output_name}'" if up.output_name else "its default output"
    if seen == "labels":
        return labels_message(spec)
    if seen == "probabilities" and up.output_kind == "logits" and columns > 1:
        return (f"model '{spec.name}' is registered with output_kind logits, but {output} of upstream {up.url} "
                "holds probabilities (rows in [0, 1] summing to 1); register upstream.output_kind probabilities")
    if seen == "logits" and up.output_kind == "probabilities":
        return (f"model '{spec.name}' is registered with output_kind probabilities, but {output} of upstream "
                f"{up.url} holds values outside [0, 1] or rows that do not sum to 1; register upstream.output_kind "
                "logits")
    return None


def check_scores(spec: ModelSpec, scores: np.ndarray) -> Kind:
    """`output_kind_of`, refused with the fix (an UpstreamError, 502) when the registration cannot fit it."""
    seen = output_kind_of(scores)
    problem = kind_problem(spec, seen, 1 if np.ndim(scores) < 2 else int(np.shape(scores)[1]))
    if problem is not None:
        raise UpstreamError(problem, url=spec.upstream.url)
    return seen


def _feature_width(meta: ModelMetadata, input_name: str | None) -> int | None:
    tensors = [t for t in meta.inputs if t.name == input_name] if input_name else meta.inputs[:1]
    if len(tensors) != 1 or len(tensors[0].shape) != 2 or tensors[0].shape[1] <= 0:
        return None
    return tensors[0].shape[1]


async def _get_json(client: UpstreamClient, url: str, timeout_s: float) -> object:
    body = await client.request("GET", url, None, timeout_s)
    try:
        return pydantic_core.from_json(body)
    except ValueError as e:
        raise UpstreamError(f"upstream {url} sent invalid JSON: {e}", url=url) from None


def _refuse(message: str) -> ApiError:
    return ApiError(400, message)


async def discover(client: UpstreamClient, spec: ModelSpec, *, probe: bool = False) -> ModelSpec:
    """The registration as it will be stored: `binary_data` resolved, `discovery` set. Raises ApiError 400 with
    the fix when the upstream shows the registration cannot work. `probe`: send one row of zeros too, where
    the feature width is declared, and check the output kind it shows."""
    up = spec.upstream
    if up.protocol != "v2":
        note = f"{up.protocol} upstreams publish no metadata; the output kind is checked on a job's first scores"
        return spec.model_copy(update={"discovery": Discovery(checked=False, notes=[note])})
    timeout_s = min(up.timeout_s, PROBE_TIMEOUT_S)
    notes: list[str] = []
    try:
        raw_meta = await client.request("GET", v2_model_url(spec), None, timeout_s)
        try:
            server = await _get_json(client, f"{up.url}/v2", timeout_s)
        except UpstreamError as e:  # a 4xx: a server without GET /v2 advertises no extension
            if e.upstream_status is None or e.upstream_status >= 500:
                raise
            server = None
    except UpstreamError as e:
        if e.upstream_status == 404:
            raise _refuse(f"upstream {up.url} has no model '{upstream_model_name(spec)}' ({e}); register the "
                          "upstream's own name for it as upstream.model_name") from None
        notes.append(f"not checked: {e}. Registered as given; `fairpatch models check {spec.name}` checks it "
                     "once the upstream answers")
        return spec.model_copy(update={"discovery": Discovery(checked=False, notes=notes)})
    extensions = server.get("extensions") if isinstance(server, dict) else None
    extensions = [str(x) for x in extensions] if isinstance(extensions, list) else []
    has_binary = binary_tensors.EXTENSION in extensions
    if up.binary_data is True and not has_binary:
        raise _refuse(f"binary_data is true, but upstream {up.url} does not advertise the binary tensor extension "
                      f"(its GET /v2 lists: {', '.join(extensions) or 'no extensions'}); register binary_data auto "
                      "or false")
    binary = has_binary if up.binary_data == "auto" else up.binary_data
    declared = decode_metadata(raw_meta, v2_model_url(spec))
    _check_names(spec, declared)
    try:
        meta = complete_metadata(spec, declared)
    except UpstreamError as e:
        raise _refuse(str(e)) from None
    if not declared.inputs or not declared.outputs:
        notes.append("the model's metadata declares no " + (
            "inputs or outputs" if not declared.inputs and not declared.outputs
            else "inputs" if not declared.inputs else "outputs") + "; the registered names are used")
    spec = spec.model_copy(update={"upstream": up.model_copy(update={"binary_data": binary})})
    scores = next(t for t in meta.outputs if t.name == (up.output_name or meta.outputs[0].name))
    if scores.datatype in INTEGER_TYPES:
        raise _refuse(labels_message(spec) + f" (it declares '{scores.name}' as {scores.datatype})")
    seen = await _probe(client, spec, meta, notes) if probe else None
    return spec.model_copy(update={"discovery": Discovery(
        checked=True, extensions=extensions, declared_inputs=[t.name for t in declared.inputs],
        declared_outputs=[t.name for t in declared.outputs], output_kind_seen=seen, notes=notes)})


def _check_names(spec: ModelSpec, declared: ModelMetadata) -> None:
    up = spec.upstream
    for what, name, tensors in (("input", up.input_name, declared.inputs),
                                ("output", up.output_name, declared.outputs)):
        names = [t.name for t in tensors]
        if name and names and name not in names:
            raise _refuse(f"model '{spec.name}' is registered with {what}_name '{name}', which upstream {up.url} "
                          f"does not declare (its {what}s: {', '.join(names)}); register one of those")


async def _probe(client: UpstreamClient, spec: ModelSpec, meta: ModelMetadata, notes: list[str]) -> Kind | None:
    """One row of zeros through the upstream, where the feature width is known; the output kind it shows."""
    width = _feature_width(meta, spec.upstream.input_name)
    if width is None:
        notes.append("the feature width is not declared, so no probe row was sent; the output kind is checked on "
                     "a job's first scores (or by `fairpatch models check --dataset`)")
        return None
    tensor = next(t for t in meta.inputs if t.name == (spec.upstream.input_name or meta.inputs[0].name))
    datatype = tensor.datatype if tensor.datatype in ("FP16", "FP32", "FP64") else "FP32"
    try:
        quick = spec.model_copy(update={"upstream": spec.upstream.model_copy(update={"timeout_s": PROBE_TIMEOUT_S})})
        scores = await client.scores(quick, np.zeros((1, width), np.float32), input_name=tensor.name,
                                     datatype=datatype, output_name=spec.upstream.output_name or meta.outputs[0].name)
    except UpstreamError as e:  # a model may refuse an all-zero row; that says nothing against the registration
        notes.append(f"the probe row was not answered ({e}); the output kind is checked on a job's first scores")
        return None
    try:
        return check_scores(spec, scores)
    except UpstreamError as e:
        raise _refuse(str(e)) from None


async def probe_rows(client: UpstreamClient, spec: ModelSpec, X: np.ndarray) -> Kind:
    """The output kind a few real rows show (`models check --dataset`), refused (400) with the fix."""
    meta = await client.metadata(spec)
    name = spec.upstream.input_name or (meta.inputs[0].name if spec.upstream.protocol == "v2" else None)
    output = spec.upstream.output_name or (meta.outputs[0].name if spec.upstream.protocol == "v2" else None)
    scores = await client.scores(spec, X, input_name=name, output_name=output)
    try:
        return check_scores(spec, scores)
    except UpstreamError as e:
        raise _refuse(str(e)) from None
