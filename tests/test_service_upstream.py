"""`fairpatch upstream`: a real uvicorn server serving ONNX models over OIP V2, checked over HTTP."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from patcher.onnx_graphs import GraphBuilder, float_tensor, int_tensor, mlp_model, tensor
from service.commands import add_service_parsers
from service.local_upstream import OnnxModel, create_upstream_app
from service.serve_thread import ServerThread
from tests.processes import ready, served, until

BODY_LIMIT = 256 * 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(5, 16)), rng.normal(size=16)), (rng.normal(size=(16, 2)), rng.normal(size=2))]
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    path.write_bytes(mlp_model(layers))
    return path


@pytest.fixture(scope="module")
def offline(mlp_path):
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    return lambda X: session.run(["logits"], {"input": X})[0]


@pytest.fixture(scope="module")
def client(mlp_path):
    app = create_upstream_app(OnnxModel(mlp_path, name="adult", version="1"), max_body_bytes=BODY_LIMIT)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def multi_io_model() -> bytes:
    """Two inputs (FP32 x [N, 3], INT64 k [N, 1]) and two outputs (y = 2x, kk = k + 1)."""
    b = GraphBuilder()
    b.op("Mul", ["x", b.const(np.array(2.0, dtype=np.float32))], "y")
    b.op("Add", ["k", b.const(np.array(1, dtype=np.int64))], "kk")
    m = b.model([float_tensor("x", ["N", 3]), int_tensor("k", ["N", 1])],
                [float_tensor("y", ["N", 3]), int_tensor("kk", ["N", 1])], "multi")
    return m.SerializeToString()


@pytest.fixture(scope="module")
def multi_client():
    with ServerThread(create_upstream_app(OnnxModel(multi_io_model(), name="multi", version="7"))) as server, \
            httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def infer_body(X: np.ndarray, nested: bool = False, **extra) -> dict:
    data = X.tolist() if nested else X.ravel().tolist()
    return {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": data}], **extra}


def rows(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


# --- metadata and health ----------------------------------------------------------------------------

def test_server_metadata_and_health(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "fairpatch-upstream" and isinstance(meta["version"], str)
    assert meta["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/models/adult", "/v2/models/adult/versions/1"])
def test_model_metadata_comes_from_the_graph(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assert r.json() == {"name": "adult", "versions": ["1"], "platform": "onnxruntime_onnx",
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}],
                        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]}


@pytest.mark.parametrize("path", ["/v2/models/adult/ready", "/v2/models/adult/versions/1/ready"])
def test_model_ready(client, path):
    assert client.get(path).json() == {"name": "adult", "ready": True}


def test_multi_io_metadata_has_int64_and_dynamic_dims(multi_client):
    meta = multi_client.get("/v2/models/multi").json()
    assert meta["versions"] == ["7"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "k", "datatype": "INT64", "shape": [-1, 1]}]
    assert [o["datatype"] for o in meta["outputs"]] == ["FP32", "INT64"]


# --- inference ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("n", [1, 7, 2000])
def test_infer_equals_onnxruntime_offline(client, offline, n, nested):
    X = rows(n, seed=n)
    r = client.post("/v2/models/adult/infer", json=infer_body(X, nested))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "adult" and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [n, 2]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_array_equal(got, offline(X))  # float32 -> JSON double -> float32 is exact


def test_versioned_infer_echoes_the_request_id(client, offline):
    X = rows(3)
    r = client.post("/v2/models/adult/versions/1/infer", json=infer_body(X, id="req-42", parameters={"a": 1}))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req-42"
    np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 2), offline(X))


def test_requested_outputs_and_integer_tensors(multi_client):
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
                       {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [[10], [-3]]}]}
    r = multi_client.post("/v2/models/multi/infer", json=body)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["y"]["data"] == [2, 4, 6, 8, 10, 12] and outs["kk"] == {
        "name": "kk", "shape": [2, 1], "datatype": "INT64", "data": [11, -2]}
    r = multi_client.post("/v2/models/multi/versions/7/infer", json={**body, "outputs": [{"name": "kk"}]})
    assert [o["name"] for o in r.json()["outputs"]] == ["kk"]
    assert r.json()["model_version"] == "7"


def test_concurrent_requests_are_all_answered_correctly(client, offline):
    batches = [rows(50, seed=s) for s in range(24)]

    def call(X):
        r = client.post("/v2/models/adult/infer", json=infer_body(X))
        return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(-1, 2)

    with ThreadPoolExecutor(8) as pool:
        for X, got in zip(batches, pool.map(call, batches), strict=True):
            np.testing.assert_array_equal(got, offline(X))


# --- bad input: 4xx JSON, and the server keeps serving ---------------------------------------------

def _input(**over) -> dict:
    t = {"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4, 0.5]}
    return {"inputs": [{**t, **over}]}


BAD = {
    "malformed json": (b'{"inputs": [', 400, "malformed JSON"),
    "empty body": (b"", 400, "empty"),
    "json array": (b"[1, 2]", 400, "invalid inference request"),
    "no inputs": ({"inputs": []}, 400, "at least 1"),
    "inputs not a list": ({"inputs": {"name": "input"}}, 400, "inputs"),
    "wrong input name": (_input(name="features"), 400, "no input 'features'"),
    "duplicate input": ({"inputs": _input()["inputs"] * 2}, 400, "more than once"),
    "wrong rank": (_input(shape=[5]), 400, "model expects [-1, 5]"),
    "wrong width": (_input(shape=[1, 4], data=[1, 2, 3, 4]), 400, "model expects [-1, 5]"),
    "count mismatch": (_input(shape=[2, 5]), 400, "needs 10 values, got 5"),
    "negative dim": (_input(shape=[-1, 5]), 400, "greater than or equal to 0"),
    "wrong datatype": (_input(datatype="FP64"), 400, "datatype FP64; model expects FP32"),
    "unknown datatype": (_input(datatype="FLOAT32"), 400, "datatype"),
    "NaN": (b'{"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, NaN, 4, 5]}]}',
            400, "NaN"),
    "Infinity": (b'{"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", '
                 b'"data": [1, 2, -Infinity, 4, 5]}]}', 400, "infinite"),
    "null value": (_input(data=[0.1, None, 0.3, 0.4, 0.5]), 400, "null"),
    "string value": (_input(data=[0.1, "a", 0.3, 0.4, 0.5]), 400, "not a valid FP32"),
    "ragged nested": (_input(data=[[0.1, 0.2], [0.3]]), 400, "not a valid FP32"),
    "missing data": ({"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32"}]}, 400, "data"),
    "unknown output": ({**_input(), "outputs": [{"name": "probs"}]}, 400, "no output"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(client, offline, case):
    body, status, message = BAD[case]
    if isinstance(body, bytes):
        r = client.post("/v2/models/adult/infer", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v2/models/adult/infer", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]
    X = rows(2)
    ok = client.post("/v2/models/adult/infer", json=infer_body(X))
    assert ok.status_code == 200
    np.testing.assert_array_equal(np.asarray(ok.json()["outputs"][0]["data"], np.float32).reshape(2, 2), offline(X))


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("GET", "/v2/models/compas", 404, "unknown model 'compas'"),
    ("GET", "/v2/models/adult/versions/2", 404, "no version '2'"),
    ("GET", "/v2/models/compas/ready", 404, "unknown model"),
    ("POST", "/v2/models/compas/infer", 404, "unknown model 'compas'"),
    ("POST", "/v2/models/adult/versions/9/infer", 404, "no version '9'"),
    ("GET", "/v1/models/adult", 404, "no such endpoint"),
    ("GET", "/v2/models/adult/infer", 405, "GET is not allowed"),
    ("DELETE", "/v2/models/adult", 405, "not allowed"),
])
def test_unknown_models_versions_and_routes(client, method, path, status, message):
    r = client.request(method, path, json=_input() if method == "POST" else None)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversize_body_is_413_whether_declared_or_streamed(client, offline):
    big = infer_body(rows(BODY_LIMIT // 40))  # ~20 bytes per float in JSON: well over the limit
    r = client.post("/v2/models/adult/infer", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must be enforced while reading
        for _ in range(BODY_LIMIT // 8192 + 2):
            yield b" " * 8192

    r = client.post("/v2/models/adult/infer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.post("/v2/models/adult/infer", json=infer_body(rows(2))).status_code == 200


def test_openapi_docs_describe_the_infer_request(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"InferRequest", "RequestInput", "InferResponse"} <= set(spec["components"]["schemas"])
    body = spec["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/InferRequest")


def test_string_tensors_are_declared_as_bytes():
    b = GraphBuilder()
    b.op("Identity", ["s"], "o")
    model = b.model([tensor("s", TensorProto.STRING, ["N"])], [tensor("o", TensorProto.STRING, ["N"])], "strings")
    meta = OnnxModel(model.SerializeToString(), name="s").metadata  # string tensors are fine: BYTES
    assert meta.inputs[0].datatype == "BYTES"


# --- the CLI ------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fairpatch")
    add_service_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_arguments():
    args = parse(["upstream", "--onnx", "m.onnx", "--name", "adult"])
    assert (args.version, args.host, args.port) == ("1", "127.0.0.1", 9000) and callable(args.run)
    assert (args.threads, args.spin) == (0, False)
    args = parse(["upstream", "--onnx", "m.onnx", "--name", "adult", "--threads", "2", "--spin"])
    assert (args.threads, args.spin) == (2, True)
    args = parse(["serve", "--port", "8123"])
    assert args.port == 8123 and args.host is None and callable(args.run)
    assert args.access_log is False and parse(["serve", "--access-log"]).access_log is True


@pytest.mark.parametrize(("threads", "spin"), [(0, False), (1, True)])
def test_the_session_spins_only_when_asked(mlp_path, threads, spin):
    """Idle intra-op threads that busy-wait burn the cores a gateway beside the upstream needs (they doubled
    the upstream's CPU per request in docs/gateway_overhead.md): off by default."""
    options = OnnxModel(mlp_path, name="m", threads=threads, spin=spin).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
    assert options.intra_op_num_threads == threads


def test_cli_refuses_a_missing_model_file(tmp_path, capsys):
    args = parse(["upstream", "--onnx", str(tmp_path / "nope.onnx"), "--name", "adult"])
    assert args.run(args) == 2
    assert "cannot load" in capsys.readouterr().err


CLI = ("import sys, argparse; from service.commands import add_service_parsers; "
       "p = argparse.ArgumentParser(); add_service_parsers(p.add_subparsers()); "
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")


def test_upstream_command_serves_and_stops_on_sigterm(mlp_path, offline, tmp_path):
    argv = [sys.executable, "-c", CLI, "upstream", "--onnx", str(mlp_path), "--name", "adult", "--port", "0",
            "--log-level", "warning"]
    with served(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, log_path=tmp_path / "upstream.log",
                name="fairpatch upstream", stop_timeout=15) as server:
        until(lambda: ready(server.url), "the upstream to be ready")
        X = rows(4)
        r = httpx.post(f"{server.url}/v2/models/adult/infer", json=infer_body(X))
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(4, 2),
                                      offline(X))
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -15 is a clean stop.
    assert server.returncode in (0, -signal.SIGTERM), server.log()
