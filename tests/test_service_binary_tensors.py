"""The binary tensor extension: the byte layout both ways, bad bodies, Triton's own client against the local
upstream, and the job workers' blocking client (HttpOracle's transport) on a binary upstream leg."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from service import binary_tensors
from service.local_upstream import OnnxModel, create_upstream_app
from service.oip import InvalidRequest, to_numpy
from service.registry import ModelSpec, UpstreamSpec
from service.serve_thread import ServerThread
from service.upstream import SyncUpstreamClient, UpstreamError, decode_v2, encode_request, encode_v2_binary, v2_tensor
from tests.conftest import random_mlp

MODEL = random_mlp(5)


@pytest.mark.parametrize(("datatype", "values"), [
    ("FP32", np.array([[1.5, -2.0], [3.25, 0.0]], dtype=np.float32)),
    ("FP64", np.array([1e300, -1e-300], dtype=np.float64)),
    ("FP16", np.array([0.5, 2.0, -1.0], dtype=np.float16)),
    ("INT64", np.array([[1, -2, 2**40]], dtype=np.int64)),
    ("UINT8", np.array([0, 255, 7], dtype=np.uint8)),
    ("BOOL", np.array([True, False, True])),
])
def test_numeric_tensors_round_trip_little_endian(datatype, values):
    raw = binary_tensors.to_bytes(values, datatype)
    assert raw == values.astype(values.dtype.newbyteorder("<")).tobytes()
    back = binary_tensors.from_bytes(raw, datatype, "x")
    assert back.dtype == values.dtype and back.flags.writeable
    np.testing.assert_array_equal(back, values.ravel())


def test_bytes_elements_are_length_prefixed():
    raw = binary_tensors.to_bytes(np.array(["Female", "é", ""], dtype=object), "BYTES")
    assert raw == struct.pack("<I", 6) + b"Female" + struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 0)
    assert binary_tensors.from_bytes(raw, "BYTES", "g") == ["Female", "é", ""]
    with pytest.raises(InvalidRequest, match="truncated BYTES"):
        binary_tensors.from_bytes(raw[:-3], "BYTES", "g")


def test_a_packed_request_parses_to_the_same_tensors():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = {"id": "r1", "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32"},
                                     {"name": "group", "shape": [3], "datatype": "BYTES"}]}
    body, n = binary_tensors.pack(header, [(header["inputs"][0], X), (header["inputs"][1], ["a", "b", "a"])])
    assert json.loads(body[:n])["inputs"][0]["parameters"] == {"binary_data_size": 48}
    req = binary_tensors.parse_request(body, str(n))
    assert req.id == "r1" and req.inputs[0].parameters is None
    np.testing.assert_array_equal(to_numpy(req.inputs[0]), X)
    assert to_numpy(req.inputs[1]).tolist() == ["a", "b", "a"]


@pytest.mark.parametrize(("body", "length", "message"), [
    (b'{"inputs": []}', "x", "must be an integer"),
    (b'{"inputs": []}', "99", "does not fit"),
    (b'{"inputs": [', "12", "malformed JSON"),
])
def test_bad_headers_are_client_errors(body, length, message):
    with pytest.raises(InvalidRequest, match=message):
        binary_tensors.parse_request(body, length)


def test_sizes_that_do_not_add_up_are_client_errors():
    header = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(InvalidRequest, match="does not fit"):
        binary_tensors.parse_request(header + b"\0" * 4, str(len(header)))
    with pytest.raises(InvalidRequest, match="belong to no input"):
        binary_tensors.parse_request(header + b"\0" * 12, str(len(header)))
    odd = header.replace(b'"binary_data_size": 8', b'"binary_data_size": 6')
    with pytest.raises(InvalidRequest, match="whole number of FP32"):
        binary_tensors.parse_request(odd + b"\0" * 6, str(len(odd)))


def test_wants_binary_follows_tritons_rules():
    assert binary_tensors.wants_binary({"binary_data": True}, None)
    assert not binary_tensors.wants_binary({"binary_data": False}, {"binary_data_output": True})
    assert binary_tensors.wants_binary(None, {"binary_data_output": True})
    assert not binary_tensors.wants_binary(None, None)


def test_upstream_request_and_answer_codecs():
    X = np.array([[1.0, 2.0]], dtype=np.float32)
    payload = encode_v2_binary([v2_tensor("input", X)])
    assert payload.headers()["inference-header-content-length"] == str(payload.header_length)
    head = json.loads(payload.body[:payload.header_length])
    assert head["parameters"] == {"binary_data_output": True}  # no outputs named: every output binary
    answer, n = binary_tensors.encode_response({"model_name": "m"}, [("logits", X, "FP32", [1, 2], None)], [True])
    response = decode_v2(answer, "u", str(n))
    assert response.outputs[0].data == [1.0, 2.0] and response.outputs[0].parameters is None
    with pytest.raises(UpstreamError, match="unreadable binary"):
        decode_v2(answer[:-1], "u", str(n))


def test_binary_data_needs_the_v2_protocol():
    with pytest.raises(ValidationError, match="binary_data needs protocol v2"):
        UpstreamSpec(url="http://h:1", protocol="v1", binary_data=True)


@pytest.fixture(scope="module")
def upstream():
    with ServerThread(create_upstream_app(OnnxModel(MODEL, name="mlp"))) as up:
        yield up


def offline(X: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def test_tritonclient_sends_and_reads_binary_data_with_the_local_upstream(upstream):
    import tritonclient.http as triton

    X = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    client = triton.InferenceServerClient(url=upstream.url.removeprefix("http://"))
    try:
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        for binary in (True, False):
            features = triton.InferInput("input", list(X.shape), "FP32")
            features.set_data_from_numpy(X, binary_data=binary)
            wanted = [triton.InferRequestedOutput("logits", binary_data=binary)]
            result = client.infer("mlp", [features], outputs=wanted)
            out = result.get_output("logits")
            assert ("binary_data_size" in (out.get("parameters") or {})) == binary
            np.testing.assert_allclose(result.as_numpy("logits"), offline(X), rtol=1e-6)
    finally:
        client.close()


def test_the_job_workers_client_speaks_binary_to_a_binary_leg(upstream):
    X = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
    binary = ModelSpec(name="mlp", upstream=UpstreamSpec(url=upstream.url, binary_data=True))
    assert encode_request(binary, X).header_length is not None
    with SyncUpstreamClient() as client:
        reply = client.call("POST", f"{upstream.url}/v2/models/mlp/infer", encode_request(binary, X), 5)
        assert reply.header_length is not None  # the upstream answered binary, as asked
        np.testing.assert_allclose(client.scores(binary, X), offline(X), rtol=1e-6)
        json_leg = binary.model_copy(update={"upstream": binary.upstream.model_copy(update={"binary_data": False})})
        np.testing.assert_array_equal(client.scores(json_leg, X), client.scores(binary, X))


@pytest.mark.parametrize("header", [{"model_name": "m"}, {"model_name": "m", "model_version": 1},
                                    {"model_name": 5}])
def test_a_binary_answer_read_as_arrays_says_what_it_says_as_lists(header):
    from service.upstream import read_v2

    X = np.array([[1.5, -2.0]], dtype=np.float32)
    answer, n = binary_tensors.encode_response(header, [("logits", X, "FP32", [1, 2], None)], [True])
    try:
        listed = read_v2(answer, "u", str(n))
    except UpstreamError as e:  # not a V2 answer: the same error either way
        with pytest.raises(UpstreamError, match="invalid V2 inference response") as got:
            read_v2(answer, "u", str(n), arrays=True)
        assert str(got.value) == str(e)
        return
    arrays = read_v2(answer, "u", str(n), arrays=True)
    assert (arrays.model_name, arrays.model_version) == (listed.model_name, listed.model_version)
    data = arrays.outputs[0].data
    assert np.asarray(data).tolist() == listed.outputs[0].data == [1.5, -2.0]
    assert type(data) is np.ndarray and data.dtype == np.float32
