"""Open Inference Protocol wire shapes and numpy conversions (no server)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.oip import (
    NUMPY_DTYPES,
    InferRequest,
    InvalidRequest,
    MetadataTensor,
    ModelMetadata,
    RequestInput,
    check_signature,
    convert,
    datatype_of,
    from_numpy,
    parse_infer_request,
    read_infer_request,
    to_numpy,
)


def tensor(data, shape, datatype="FP32", name="x") -> RequestInput:
    return RequestInput(name=name, shape=shape, datatype=datatype, data=data)


def test_flat_and_nested_data_give_the_same_array():
    flat = to_numpy(tensor([1, 2, 3, 4, 5, 6], [2, 3]))
    nested = to_numpy(tensor([[1, 2, 3], [4, 5, 6]], [2, 3]))
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, np.arange(1, 7, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(("datatype", "data", "dtype"), [
    ("FP64", [0.5, 1.0], np.float64), ("FP16", [0.5, 1.0], np.float16), ("INT64", [1, -2], np.int64),
    ("INT32", [1, 2.0], np.int32), ("UINT8", [0, 255], np.uint8), ("BOOL", [True, False], np.bool_),
])
def test_datatypes_convert_to_their_numpy_dtype(datatype, data, dtype):
    arr = to_numpy(tensor(data, [2], datatype))
    assert arr.dtype == dtype
    np.testing.assert_array_equal(arr, np.asarray(data).astype(dtype))


def test_bytes_become_an_object_array_of_str():
    arr = to_numpy(tensor([["a", "b"], ["c", "d"]], [2, 2], "BYTES"))
    assert arr.dtype == object and arr.shape == (2, 2) and arr[1, 0] == "c"


def test_empty_batch_is_allowed():
    assert to_numpy(tensor([], [0, 5])).shape == (0, 5)


@pytest.mark.parametrize(("datatype", "data", "shape", "message"), [
    ("FP32", [1, 2, 3], [2, 2], "needs 4 values, got 3"),
    ("FP32", [1.0, float("nan")], [2], "NaN"),
    ("FP32", [1.0, float("inf")], [2], "NaN, infinite"),
    ("FP32", [1.0, None], [2], "null"),
    ("FP32", [1e39, 0.0], [2], "range"),  # finite in JSON, infinite as FP32
    ("FP32", [1.0, "abc"], [2], "not a valid FP32"),
    ("FP32", [[1, 2], [3]], [3], "not a valid FP32"),
    ("FP32", [{"a": 1}], [1], "not a valid FP32"),
    ("INT64", [1.5, 2], [2], "non-integer"),
    ("INT64", [True, False], [2], "must be integers"),
    ("INT64", [2**70], [1], "outside the INT64 range"),
    # floats at the exclusive bound: float(2**63 - 1) rounds to 2**63, so a float compare with the int bound
    # passed them and the cast wrapped (found by benchmarks/fuzz_long.py)
    ("INT64", [float(2**63)], [1], "outside the INT64 range"),
    ("UINT64", [float(2**64)], [1], "outside the UINT64 range"),
    ("INT32", [float(2**31)], [1], "outside the INT32 range"),
    ("INT8", [1, 300], [2], "outside the INT8 range"),
    ("UINT8", [-1], [1], "outside the UINT8 range"),
    ("BOOL", [1, 0], [2], "true/false"),
    ("BYTES", ["a", 1], [2], "strings"),
])
def test_bad_tensors_are_rejected_with_a_clear_message(datatype, data, shape, message):
    with pytest.raises(InvalidRequest, match=message):
        to_numpy(tensor(data, shape, datatype))


def test_numpy_to_response_tensor_round_trips_exactly():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    out = from_numpy("y", x)
    assert out.datatype == "FP32" and out.shape == [4, 3] and len(out.data) == 12
    back = to_numpy(tensor(out.data, out.shape))
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize(("dtype", "name"), [
    (np.float32, "FP32"), (np.float64, "FP64"), (np.int64, "INT64"), (np.uint16, "UINT16"), (np.bool_, "BOOL"),
    (np.dtype("<U3"), "BYTES"), (object, "BYTES"),
])
def test_datatype_names(dtype, name):
    assert datatype_of(np.dtype(dtype)) == name


def test_complex_arrays_have_no_datatype():
    with pytest.raises(ValueError, match="no Open Inference Protocol datatype"):
        datatype_of(np.complex64)


def test_parse_rejects_malformed_and_invalid_bodies():
    with pytest.raises(InvalidRequest, match="malformed JSON"):
        parse_infer_request(b'{"inputs": [')
    with pytest.raises(InvalidRequest, match="empty request body"):
        parse_infer_request(b"")
    with pytest.raises(InvalidRequest, match=r"inputs\.0\.shape\.0"):
        parse_infer_request(b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}')
    with pytest.raises(InvalidRequest, match="datatype"):
        parse_infer_request(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}')
    req = parse_infer_request(b'{"id": "r1", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", '
                              b'"data": [1]}], "outputs": [{"name": "y"}], "extra_field": 1}')
    assert req.id == "r1" and req.outputs[0].name == "y"


META = ModelMetadata(name="m", platform="p", inputs=[MetadataTensor(name="x", datatype="FP32", shape=[-1, 3])],
                     outputs=[MetadataTensor(name="y", datatype="FP32", shape=[-1, 2])])


def request(*inputs: RequestInput, outputs=None) -> InferRequest:
    return InferRequest(inputs=list(inputs), outputs=outputs)


def test_signature_check_accepts_any_batch_size():
    for rows in (0, 1, 3, 1000):  # check_signature returns None for a fitting request and raises otherwise
        assert check_signature(META, request(tensor([0.0] * 3 * rows, [rows, 3]))) is None
    assert check_signature(META, request(tensor([0.0] * 3, [1, 3]), outputs=[{"name": "y"}])) is None
    with pytest.raises(InvalidRequest, match="shape"):
        check_signature(META, request(tensor([0.0] * 4, [1, 4])))


@pytest.mark.parametrize(("req", "message"), [
    (request(tensor([0.0] * 3, [1, 3], name="z")), "has no input 'z'"),
    (request(tensor([0.0] * 3, [1, 3]), tensor([0.0] * 3, [1, 3])), "more than once"),
    (request(tensor([0.0] * 3, [1, 3], "FP64")), "datatype FP64; model expects FP32"),
    (request(tensor([0.0] * 4, [1, 4])), r"shape \[1, 4\]; model expects \[-1, 3\]"),
    (request(tensor([0.0] * 3, [3])), r"shape \[3\]"),
    (request(tensor([0.0] * 3, [1, 3]), outputs=[{"name": "nope"}]), "no output"),
])
def test_signature_check_rejects_mismatches(req, message):
    with pytest.raises(InvalidRequest, match=message):
        check_signature(META, req)


def test_missing_inputs_are_named():
    meta = META.model_copy(update={"inputs": [*META.inputs, MetadataTensor(name="g", datatype="INT64", shape=[-1])]})
    with pytest.raises(InvalidRequest, match="missing input.*g"):
        check_signature(meta, request(tensor([0.0] * 3, [1, 3])))


# --- the orjson path agrees with pydantic ----------------------------------------------------------------

def _t(**over) -> dict:
    return {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1.0, 2, 3, 4, 5, 6], **over}


PARSE_DOCS = [
    {"inputs": [_t()]},
    {"id": "r1", "parameters": {"a": 1, "b": None}, "inputs": [_t(parameters={"p": [1]}), _t(name="g")],
     "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": True}}], "extra": 1},
    {"inputs": [_t()], "outputs": []},
    {"inputs": [_t(shape=[1.0, 6])]},  # pydantic coerces 1.0 to 1
    {"inputs": [_t(shape=["2", "3"])]},  # and "2" to 2
    {"inputs": [_t(shape=[True, 6])]},
    {"inputs": [_t(shape=[-1, 6])]},
    {"inputs": [_t(datatype="FLOAT")]},
    {"inputs": [_t(datatype=7)]},
    {"inputs": [_t(name=3)]},
    {"inputs": [_t(data="abc")]},
    {"inputs": [_t(data={"a": 1})]},
    {"inputs": [_t(parameters=[1])]},
    {"inputs": [{k: v for k, v in _t().items() if k != "data"}]},
    {"inputs": []},
    {"inputs": {"x": 1}},
    {"id": 5, "inputs": [_t()]},
    {"parameters": "p", "inputs": [_t()]},
    {"inputs": [_t()], "outputs": {"name": "y"}},
    {"inputs": [_t()], "outputs": [{"name": 1}]},
    {"inputs": [_t()], "outputs": [{"parameters": {}}]},
    [_t()],
    "inputs",
]


@pytest.mark.parametrize("doc", PARSE_DOCS)
def test_the_orjson_path_accepts_only_what_pydantic_accepts_unchanged(doc):
    import json

    from pydantic import ValidationError

    from service.oip import infer_request_from_doc

    fast = infer_request_from_doc(json.loads(json.dumps(doc)))
    try:
        expected = InferRequest.model_validate(doc)
    except ValidationError:
        expected = None
    if fast is not None:  # taken: the same object pydantic builds, with nothing it would have changed
        assert expected is not None and fast.model_dump() == expected.model_dump()
        assert fast.model_dump_json(exclude_none=True) == expected.model_dump_json(exclude_none=True)
    body = json.dumps(doc).encode()
    if expected is None:  # refused: the same error as before, worded by pydantic
        with pytest.raises(InvalidRequest, match="invalid inference request"):
            parse_infer_request(body)
    else:
        assert parse_infer_request(body).model_dump() == expected.model_dump()
    plain = doc in PARSE_DOCS[:3]
    assert (fast is not None) == plain  # the plain documents take the fast path, every other one pydantic's


@pytest.mark.parametrize("body", [b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
                                  b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e400]}]}'])
def test_json_orjson_refuses_is_still_read_as_pydantic_reads_it(body):
    req = parse_infer_request(body)  # NaN literals and overflowing numbers parse (and to_numpy refuses them)
    with pytest.raises(InvalidRequest, match="NaN, infinite"):
        to_numpy(req.inputs[0])


def test_responses_decode_the_same_on_both_paths():
    import json

    from pydantic import ValidationError

    from service.oip import InferResponse, infer_response_from_doc

    out = {"name": "y", "shape": [2, -1], "datatype": "FP32", "data": [0.5, 1.5]}
    docs = [{"model_name": "m", "outputs": [out]},
            {"model_name": "m", "model_version": "1", "id": "i", "parameters": {"k": "v"},
             "outputs": [out, {**out, "name": "z", "parameters": {"p": 1}}]},
            {"model_name": "m", "model_version": 1, "outputs": [out]},
            {"model_name": "m", "outputs": [{**out, "datatype": "F32"}]},
            {"model_name": "m", "outputs": [{**out, "shape": [2.0]}]},
            {"model_name": "m"}, {"outputs": [out]}]
    for i, doc in enumerate(docs):
        fast = infer_response_from_doc(json.loads(json.dumps(doc)))
        try:
            expected = InferResponse.model_validate(doc)
        except ValidationError:
            expected = None
        assert (fast is not None) == (i < 2), doc
        if fast is not None:
            assert fast.model_dump() == expected.model_dump()


def test_construct_builds_what_validation_builds():
    from service.oip import InferResponse, RequestOutput, ResponseOutput, construct

    cases = [(ResponseOutput, {"name": "y", "shape": [1, 2], "datatype": "FP32", "parameters": None, "data": [1, 2]}),
             (RequestOutput, {"name": "y", "parameters": {"a": 1}}),
             (RequestInput, {"name": "x", "shape": [1], "datatype": "INT64", "parameters": None, "data": [3]})]
    for cls, values in cases:
        built, validated = construct(cls, dict(values)), cls.model_validate(values)
        assert built == validated and built.model_fields_set == validated.model_fields_set
        assert built.model_dump_json(exclude_none=True) == validated.model_dump_json(exclude_none=True)
    response = construct(InferResponse, {"model_name": "m", "model_version": None, "id": None, "parameters": None,
                                         "outputs": [construct(*cases[0])]})
    assert response.model_dump_json(exclude_none=True) == \
        '{"model_name":"m","outputs":[{"name":"y","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def _big(doc: dict) -> bytes:
    """`doc` as JSON padded past the size simdjson parses from (whitespace, which JSON ignores)."""
    from service.oip import SIMD_MIN_BYTES

    body = orjson.dumps(doc)
    return body + b" " * max(0, SIMD_MIN_BYTES - len(body))


_X = np.linspace(-3.3, 7.7, 600).astype(np.float32)
SIMD_BODIES = [
    _big({"id": "a", "parameters": {"p": [1, {"q": None}]}, "inputs": [
        {"name": "x", "shape": [100, 6], "datatype": "FP32", "data": _X.tolist()},
        {"name": "group", "shape": [2], "datatype": "BYTES", "data": ["f", "m"]}], "outputs": [{"name": "y"}]}),
    _big({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2.5, -0.0]}]}),  # ints and floats
    _big({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]}]}),
    _big({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [[1.0, 2.0], [3.0]]}]}),  # ragged
    _big({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, None]}]}),
    _big({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, True]}]}),
    _big({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, "2"]}]}),
    _big({"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}),
    _big({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [2 ** 60 + 1]}]}),  # past 2**53
    _big({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [16777217]}]}),
    _big({"inputs": [{"name": "x", "shape": [0], "datatype": "FP32", "data": []}]}),
    _big({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": {"a": 1}}]}),
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.5], "data": [2.5]}]}' + b" " * 4096,
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e400]}]}' + b" " * 4096,
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}' + b" " * 4096,
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],}' + b" " * 4096,
    b'{"inputs": [{"name": "x", "shape": [123456789012345678901234567890], "datatype": "FP32", "data": [1]}]}' +
    b" " * 4096,
    b"[1, 2]" + b" " * 4096,
]


def _read(body: bytes):
    """(the request, each input's values by to_numpy) or the error's text."""
    try:
        req = read_infer_request(body)
    except InvalidRequest as e:
        return str(e)
    values = []
    for t in req.inputs:
        try:
            values.append(to_numpy(t))
        except InvalidRequest as e:
            values.append(str(e))
    return req, values


@pytest.mark.parametrize("body", SIMD_BODIES)
def test_simdjson_reads_every_body_as_orjson_does(body, monkeypatch):
    pytest.importorskip("simdjson")
    from service import oip

    fast = _read(body)
    monkeypatch.setattr(oip, "simdjson", None)
    slow = _read(body)
    if isinstance(slow, str):
        assert fast == slow
        return
    (freq, fvalues), (sreq, svalues) = fast, slow
    assert [(t.name, t.shape, t.datatype, t.parameters) for t in freq.inputs] == \
        [(t.name, t.shape, t.datatype, t.parameters) for t in sreq.inputs]
    assert (freq.id, freq.parameters, freq.outputs) == (sreq.id, sreq.parameters, sreq.outputs)
    for f, s in zip(fvalues, svalues, strict=True):
        if isinstance(s, str):
            assert f == s
        else:
            assert f.dtype == s.dtype and f.shape == s.shape and np.array_equal(f, s)


def test_simdjson_reads_a_large_float_tensor_into_an_array():
    pytest.importorskip("simdjson")
    req = read_infer_request(SIMD_BODIES[0])
    assert type(req.inputs[0].data) is np.ndarray and req.inputs[0].data.dtype == np.float64
    assert req.inputs[1].data == ["f", "m"]  # the group names as the list they were
    np.testing.assert_array_equal(to_numpy(req.inputs[0]), _X.reshape(100, 6))


def test_simdjson_parser_is_reused_and_replaced_while_a_value_of_it_lives():
    pytest.importorskip("simdjson")
    from service import oip

    first = oip._parser()
    assert oip._parser() is first  # nothing of the last parse held: the same parser again
    held = first.parse(b"[1, 2]")  # a value that keeps the parser busy
    assert type(read_infer_request(SIMD_BODIES[0]).inputs[0].data) is np.ndarray  # read by another parser
    assert oip._parser() is not first
    assert held.as_list() == [1, 2]


def test_float_lists_read_by_way_of_float64_give_numpys_own_values_and_range():
    # JSON float lists are read as doubles and cast (numpy's per-value float32 cast is several times slower): the
    # same values, and at the range's edge the same outcome as the direct, checked conversion.
    values = np.random.default_rng(3).normal(scale=1e3, size=(7, 5)).tolist()
    for datatype in ("FP16", "FP32", "FP64"):
        got = convert(values, datatype, "x")
        want = np.asarray(values, dtype=NUMPY_DTYPES[datatype])
        assert got.dtype == want.dtype and got.shape == (7, 5) and np.array_equal(got, want)
    assert convert([65519.0], "FP16", "x").tolist() == [65504.0]  # rounds down to the largest half, as before
    assert convert([1e39], "FP64", "x").tolist() == [1e39]
    for datatype, data in (("FP16", [65520.0]), ("FP32", [1e39]), ("FP32", [1.0, None]), ("FP64", [float("inf")])):
        with pytest.raises(InvalidRequest, match="NaN, infinite or null"):
            convert(data, datatype, "x")
