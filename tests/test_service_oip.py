"""Open Inference Protocol wire shapes and numpy conversions (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from service.oip import (
    InferRequest,
    InvalidRequest,
    MetadataTensor,
    ModelMetadata,
    RequestInput,
    check_signature,
    datatype_of,
    from_numpy,
    parse_infer_request,
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
    ("INT64", [2**70], [1], "must be integers"),
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
    check_signature(META, request(tensor([0.0] * 9, [3, 3])))
    check_signature(META, request(tensor([0.0] * 3, [1, 3]), outputs=[{"name": "y"}]))


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
