"""Upstream adapters and clients: pure encode/decode, then real tiny servers on loopback (V1, MLflow,
scripted failures, the local V2 upstream), and `HttpOracle` against OnnxOracle."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from patcher.oracle import BudgetExceeded, OnnxOracle
from patcher.scores import to_log_probs
from service.http_oracle import HttpOracle
from service.local_upstream import OnnxModel, create_upstream_app
from service.oip import InferRequest, RequestInput, RequestOutput, Tensor
from service.registry import ModelSpec, UpstreamSpec
from service.serve_thread import ServerThread
from service.upstream import (
    SyncUpstreamClient,
    UpstreamClient,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    decode_scores,
    encode_request,
    encode_v2,
    encode_v2_pydantic,
    error_from_response,
    infer_url,
    v2_model_url,
)
from tests.conftest import random_mlp
from tests.test_service_jobs import CountingUpstream

MODEL = random_mlp(5)


def spec(url: str = "http://127.0.0.1:9", protocol: str = "v2", **up) -> ModelSpec:
    return ModelSpec(name="m", version="1", upstream=UpstreamSpec(url=url, protocol=protocol, **up))


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])


def offline(session, X: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"input": X.astype(np.float32)})[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- pure adapters ----------------------------------------------------------------------------------

def test_urls_per_protocol():
    assert infer_url(spec("http://h:1/")) == "http://h:1/v2/models/m/infer"
    s = spec("http://h:1", model_name="my model", model_version="7")
    assert v2_model_url(s) == "http://h:1/v2/models/my%20model/versions/7"
    assert infer_url(s) == "http://h:1/v2/models/my%20model/versions/7/infer"
    assert infer_url(spec("http://h:1", "v1", model_name="clf")) == "http://h:1/v1/models/clf:predict"
    assert infer_url(spec("http://h:1/base", "mlflow")) == "http://h:1/base/invocations"


def test_request_bodies_per_protocol():
    X = np.array([[1.5, 2.0], [3.0, -4.25]], dtype=np.float32)
    v2 = InferRequest.model_validate_json(encode_request(spec(input_name="x"), X).body)
    (t,) = v2.inputs
    assert (t.name, t.shape, t.datatype, t.data) == ("x", [2, 2], "FP32", [1.5, 2.0, 3.0, -4.25])
    assert json.loads(encode_request(spec(), X, input_name="feat", datatype="FP64").body)["inputs"][0]["name"] \
        == "feat"
    assert json.loads(encode_request(spec(protocol="v1"), X).body) == {"instances": [[1.5, 2.0], [3.0, -4.25]]}
    assert json.loads(encode_request(spec(protocol="mlflow"), X).body) == {"inputs": [[1.5, 2.0], [3.0, -4.25]]}
    assert all(encode_request(spec(protocol=p), X).header_length is None for p in ("v2", "v1", "mlflow"))


def _v2_cases():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f32 = bits[np.isfinite(bits)]  # every exponent, subnormals included
    adult_like = rng.normal(size=(64, 103)).astype(np.float32)
    return {
        "floats as parsed": ([Tensor("input", [64, 103], "FP32", None, adult_like.ravel().tolist())], None, None),
        "float32 array": ([Tensor("input", [len(f32)], "FP32", None, f32)], None, None),
        "float16 and float64 arrays": ([Tensor("h", [3], "FP16", None, np.array([0.1, -2.5, 65504], np.float16)),
                                        Tensor("d", [2], "FP64", None, np.array([0.1, 1e300]))], None, None),
        "integers, bools, strings": ([Tensor("i", [3], "INT64", None, np.array([-(2**63), 0, 2**63 - 1])),
                                      Tensor("u", [2], "UINT8", None, np.array([0, 255], np.uint8)),
                                      Tensor("b", [2], "BOOL", None, np.array([True, False])),
                                      Tensor("s", [2], "BYTES", None, np.array(["a", "é"], dtype=object)),
                                      Tensor("l", [2, 2], "INT32", {"k": None}, [[1, 2], [3, 4]])], None, None),
        "outputs, parameters, id": ([RequestInput(name="x", shape=[1], datatype="FP32", data=[0.5])],
                                    [RequestOutput(name="a"), RequestOutput(name="b", parameters={"p": 1})],
                                    {"fairpatch_x": "y", "n": None, "nested": {"f": 1.5}}),
        "ints past 64 bits (pydantic writes them)": ([Tensor("x", [1], "FP64", None, [2**70])], None, {"b": 2**80}),
        "empty parameters": ([Tensor("x", [0, 2], "FP32", None, np.zeros((0, 2), np.float32))], None, {}),
    }


@pytest.mark.parametrize("case", list(_v2_cases()))
def test_v2_request_bodies_are_pydantics_bytes(case):
    """orjson writes the upstream request in the bytes pydantic-core wrote (numbers, field order, omissions)."""
    inputs, outputs, parameters = _v2_cases()[case]
    for rid in (None, "r-1"):
        assert encode_v2(inputs, outputs, parameters, rid) == encode_v2_pydantic(inputs, outputs, parameters, rid)


def test_v2_scores_pick_the_named_output_or_the_first():
    body = json.dumps({"model_name": "m", "outputs": [
        {"name": "emb", "shape": [2, 1], "datatype": "FP32", "data": [9, 9]},
        {"name": "logits", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
    np.testing.assert_array_equal(decode_scores(spec(output_name="logits"), body, "u"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(decode_scores(spec(), body, "u"), [[9], [9]])
    with pytest.raises(UpstreamError, match="no output 'probs'.*emb, logits"):
        decode_scores(spec(output_name="probs"), body, "u")
    with pytest.raises(UpstreamError, match="invalid V2 inference response"):
        decode_scores(spec(), b'{"outputs": 3}', "u")
    with pytest.raises(UpstreamError, match=r"shape \[2, 2\] needs 4 values, got 3"):
        decode_scores(spec(), b'{"model_name": "m", "outputs": [{"name": "o", "shape": [2, 2], "datatype": "FP32",'
                              b' "data": [1, 2, 3]}]}', "u")


@pytest.mark.parametrize(("protocol", "body", "expected"), [
    ("v1", {"predictions": [[0.1, 0.9], [0.8, 0.2]]}, [[0.1, 0.9], [0.8, 0.2]]),
    ("v1", {"predictions": [0.3, 0.6]}, [0.3, 0.6]),
    ("mlflow", {"predictions": [[1, 2]]}, [[1, 2]]),
    ("mlflow", [[1, 2], [3, 4]], [[1, 2], [3, 4]]),  # bare list
    ("mlflow", {"predictions": [{"0": 0.2, "1": 0.8}]}, [[0.2, 0.8]]),  # DataFrame records
])
def test_v1_and_mlflow_predictions(protocol, body, expected):
    np.testing.assert_array_equal(decode_scores(spec(protocol=protocol), json.dumps(body).encode(), "u"), expected)


@pytest.mark.parametrize(("protocol", "body", "message"), [
    ("v1", [[1, 2]], "must be an object"),
    ("v1", {"outputs": []}, "no 'predictions'"),
    ("mlflow", {"predictions": ["a", "b"]}, "not a numeric array"),
    ("mlflow", {"predictions": [[1, None]]}, "NaN, infinite or null"),
    ("mlflow", {"predictions": []}, "expected \\[N\\] or \\[N, C\\]"),
])
def test_bad_v1_and_mlflow_answers(protocol, body, message):
    with pytest.raises(UpstreamError, match=message):
        decode_scores(spec(protocol=protocol), json.dumps(body).encode(), "u")
    with pytest.raises(UpstreamError, match="invalid JSON"):
        decode_scores(spec(protocol=protocol), b"{not json", "u")


def test_error_mapping_names_the_url_status_and_the_upstreams_own_text():
    e = error_from_response("http://up/x", 500, b'{"error": "CUDA out of memory"}')
    assert type(e) is UpstreamError and e.status_code == 502 and e.upstream_status == 500
    assert "http://up/x" in e.message and "500" in e.message and "CUDA out of memory" in e.message
    e = error_from_response("http://up/x", 400, b'{"error": "input has 4 columns"}')
    assert isinstance(e, UpstreamRejected) and e.status_code == 400 and "input has 4 columns" in e.message
    assert error_from_response("u", 413, b"").status_code == 413
    assert error_from_response("u", 422, b'{"detail": [{"msg": "x"}]}').status_code == 400
    e = error_from_response("u", 504, b"gateway timeout")
    assert isinstance(e, UpstreamTimeout) and e.status_code == 504 and "gateway timeout" in e.message
    assert "bad schema" in error_from_response("u", 500, b'{"error_code": "E", "message": "bad schema"}').message
    assert "<html>oops" in error_from_response("u", 503, b"<html>oops</html>").message


# --- tiny real servers --------------------------------------------------------------------------------

def v1_app(session) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request):
        X = np.asarray((await request.json())["instances"], dtype=np.float32)
        return {"predictions": offline(session, X).tolist()}

    return app


def mlflow_app(session) -> FastAPI:
    app = FastAPI()

    @app.post("/invocations")
    async def invocations(request: Request, shape: str = "dict"):
        X = np.asarray((await request.json())["inputs"], dtype=np.float32)
        out = offline(session, X)
        if shape == "list":
            return out.tolist()
        if shape == "records":
            return {"predictions": [{"a": float(r[0]), "b": float(r[1])} for r in out]}
        return {"predictions": out.tolist()}

    return app


class Script:
    """An upstream that answers from a script of (status, body) and counts calls; 'sleep' stalls."""

    def __init__(self, session) -> None:
        self.session, self.script, self.calls = session, [], 0
        self.app = FastAPI()

        @self.app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request):
            self.calls += 1
            step = self.script.pop(0) if self.script else (200, None)
            if step == "sleep":
                await asyncio.sleep(0.6)
                step = (200, None)
            status, body = step
            if status == 200:
                X = np.asarray((await request.json())["instances"], dtype=np.float32)
                return {"predictions": offline(self.session, X).tolist()}
            return JSONResponse(body, status_code=status)

    def run(self, *steps) -> None:
        self.script, self.calls = list(steps), 0


@pytest.fixture(scope="module")
def servers(session):
    script = Script(session)
    with ServerThread(v1_app(session)) as v1, ServerThread(mlflow_app(session)) as mlflow, \
            ServerThread(script.app) as scripted, \
            ServerThread(create_upstream_app(OnnxModel(MODEL, name="mlp", version="1"))) as v2:
        yield {"v1": v1.url, "mlflow": mlflow.url, "script": scripted.url, "v2": v2.url, "scripted": script}


def test_v1_adapter_against_a_real_server(servers, session):
    X = rows(7)
    s = spec(servers["v1"], "v1", model_name="clf")

    async def main():
        async with UpstreamClient() as client:
            return await client.scores(s, X)

    np.testing.assert_allclose(asyncio.run(main()), offline(session, X), rtol=1e-6)
    with SyncUpstreamClient() as client:
        np.testing.assert_allclose(client.scores(s, X), offline(session, X), rtol=1e-6)
        assert client.metadata(s).inputs[0].shape == [-1, -1]  # synthesised: V1 has no metadata


@pytest.mark.parametrize("shape", ["dict", "list", "records"])
def test_mlflow_adapter_against_a_real_server(servers, session, shape):
    X = rows(4, seed=3)
    s = spec(servers["mlflow"], "mlflow")
    url = infer_url(s) + f"?shape={shape}"
    with SyncUpstreamClient() as client:
        body = client.request("POST", url, encode_request(s, X).body, 5)
    np.testing.assert_allclose(decode_scores(s, body, url), offline(session, X), rtol=1e-6)


def test_v2_adapter_forwards_and_reads_metadata(servers, session):
    X = rows(3)
    s = spec(servers["v2"], model_name="mlp")

    async def main():
        async with UpstreamClient() as client:
            meta = await client.metadata(s)
            return meta, await client.scores(s, X, input_name=meta.inputs[0].name)

    meta, scores = asyncio.run(main())
    assert [t.name for t in meta.inputs] == ["input"] and meta.outputs[0].name == "logits"
    np.testing.assert_array_equal(scores, offline(session, X))


def test_retries_on_503_then_succeeds(servers, session):
    script, X = servers["scripted"], rows(2)
    s = spec(servers["script"], "v1")
    script.run((503, {"error": "warming up"}), (502, {"error": "bad gateway"}))

    async def main():
        async with UpstreamClient(retries=2, backoff_s=0.01) as client:
            return await client.scores(s, X)

    np.testing.assert_allclose(asyncio.run(main()), offline(session, X), rtol=1e-6)
    assert script.calls == 3


def test_retries_are_bounded_and_the_error_carries_the_upstream_text(servers):
    script, s = servers["scripted"], spec(servers["script"], "v1")
    script.run(*[(503, {"error": "overloaded, try later"})] * 5)
    with SyncUpstreamClient(retries=2, backoff_s=0.01) as client, pytest.raises(UpstreamError) as info:
        client.scores(s, rows(1))
    assert script.calls == 3 and info.value.status_code == 502 and info.value.upstream_status == 503
    assert servers["script"] in info.value.message and "overloaded, try later" in info.value.message


@pytest.mark.parametrize(("status", "kind", "code"), [(500, UpstreamError, 502), (400, UpstreamRejected, 400),
                                                      (404, UpstreamError, 502)])
def test_other_failures_are_not_retried(servers, status, kind, code):
    script, s = servers["scripted"], spec(servers["script"], "v1")
    script.run((status, {"error": f"failure {status}"}))
    with SyncUpstreamClient(retries=3, backoff_s=0.01) as client, pytest.raises(kind) as info:
        client.scores(s, rows(1))
    assert script.calls == 1 and info.value.status_code == code and f"failure {status}" in info.value.message


def test_unreachable_upstream_is_an_upstream_error_after_retries():
    s = spec(f"http://127.0.0.1:{closed_port()}", "v1")

    async def main():
        async with UpstreamClient(retries=2, backoff_s=0.01) as client:
            await client.scores(s, rows(1))

    with pytest.raises(UpstreamError) as info:
        asyncio.run(main())
    assert type(info.value) is UpstreamError and info.value.status_code == 502
    assert "cannot reach upstream" in info.value.message and s.upstream.url in info.value.message


@pytest.mark.parametrize("sync", [False, True])
def test_slow_upstream_times_out_at_the_deadline(servers, sync):
    script = servers["scripted"]
    s = spec(servers["script"], "v1", timeout_s=0.3)
    script.run("sleep")

    async def main():
        async with UpstreamClient() as client:
            await client.scores(s, rows(1))

    with pytest.raises(UpstreamTimeout) as info:  # the scripted answer would take far longer
        if sync:
            with SyncUpstreamClient() as client:
                client.scores(s, rows(1))
        else:
            asyncio.run(main())
    assert info.value.status_code == 504 and "within 0.3s" in info.value.message


def test_an_answer_whose_body_stalls_times_out_at_the_deadline_too():
    # The deadline covers the whole exchange: an answer whose head came in time but whose body does not is a 504.
    async def main(server: RawServer):
        async with server as url, UpstreamClient() as client:
            await client.scores(spec(url, "v1", timeout_s=0.3), rows(1))

    with pytest.raises(UpstreamTimeout) as info:
        asyncio.run(main(RawServer(stall_body_s=5.0)))
    assert info.value.status_code == 504 and "within 0.3s" in info.value.message


# --- HttpOracle -----------------------------------------------------------------------------------------

def test_http_oracle_counts_rows_and_equals_the_onnx_oracle():
    X = rows(30, seed=5)
    upstream = CountingUpstream(create_upstream_app(OnnxModel(MODEL, name="mlp")))  # counts the rows it receives
    with ServerThread(upstream) as server, \
            HttpOracle(spec(server.url, model_name="mlp"), budget=40, batch_size=8) as oracle:  # input name: metadata
        got = oracle.scores(X)
        assert oracle.output_kind == "logits"
        np.testing.assert_array_equal(got, OnnxOracle(MODEL).scores(X))
        assert upstream.rows == oracle.queries_used == 30 and oracle.remaining == 10
        assert upstream.requests == 4  # batches of 8
        np.testing.assert_array_equal(oracle.scores(X[:10]), got[:10])  # paid rows are not paid twice
        assert upstream.rows == oracle.queries_used == 30
        with pytest.raises(BudgetExceeded):
            oracle.scores(rows(11, seed=6))
        assert upstream.rows == oracle.queries_used == 30  # refused before anything was sent
        np.testing.assert_allclose(oracle.log_probs(X), to_log_probs(got, "logits"))


def test_http_oracle_over_v1_refuses_logits_registered_as_probabilities(servers, session):
    X = rows(6, seed=8)
    s = spec(servers["v1"], "v1", output_kind="probabilities")  # the server answers logits
    with HttpOracle(s, budget=6) as oracle:
        assert oracle.output_kind == "probabilities"
        # the first scores are checked against the registration (service.discovery): refused with the fix
        with pytest.raises(UpstreamError, match="register upstream.output_kind logits"):
            oracle.scores(X)


# --- the async client's transport: pooling, stale keep-alive connections, shutdown ---------------------

class RawServer:
    """A bare HTTP/1.1 server on loopback (asyncio streams) that counts connections and can drop the
    n-th request on a connection without answering, the way a server closes an idle keep-alive
    connection just as the client reuses it."""

    def __init__(self, drop_from: int | None = None, delay_s: float = 0.0, reset: bool = False,
                 stall_body_s: float = 0.0) -> None:
        self.drop_from, self.delay_s, self.reset = drop_from, delay_s, reset
        self.stall_body_s = stall_body_s  # the answer's head and half its body at once, the rest this much later
        self.connections, self.requests, self.headers = 0, 0, []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.reset and self.drop_from is not None and served + 1 >= self.drop_from:
                    # a reset, not a clean close: the client's write of the request fails
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.headers.append({})
                    return
                lines = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                await reader.readexactly(int(headers.get("content-length", 0)))
                self.headers.append(headers)
                served += 1
                if self.drop_from is not None and served >= self.drop_from:
                    return  # closes the connection: no answer to this request
                self.requests += 1
                await asyncio.sleep(self.delay_s)
                body = b'{"predictions": [[0.25, 0.75]]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body[:10]))
                await writer.drain()
                if self.stall_body_s:
                    await asyncio.sleep(self.stall_body_s)
                writer.write(body[10:])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_async_client_pools_connections_within_its_limit(monkeypatch):
    # A proxy in the environment must not reroute upstream calls (it does not exist: any use would fail).
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")

    async def main(server: RawServer):
        async with server as url, UpstreamClient(max_connections=4) as client:
            s = spec(url, "v1")
            for _ in range(10):  # one after another: one keep-alive connection
                np.testing.assert_array_equal(await client.scores(s, rows(1)), [[0.25, 0.75]])
            sequential = server.connections
            results = await asyncio.gather(*(client.scores(s, rows(1)) for _ in range(16)))
            return sequential, results

    server = RawServer(delay_s=0.02)
    sequential, results = asyncio.run(main(server))
    assert sequential == 1 and server.requests == 26
    assert 1 < server.connections <= 4  # concurrent calls opened more, never above max_connections
    assert all(r.tolist() == [[0.25, 0.75]] for r in results)
    assert server.headers[0]["user-agent"].startswith("fairpatch-gateway/")


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize(("reset", "cause"), [(False, "ServerDisconnectedError"), (True, "ClientOSError")])
def test_a_request_dropped_or_reset_on_a_reused_connection_is_retried_on_a_new_one(retries, reset, cause):
    async def main(server: RawServer):
        async with server as url, UpstreamClient(retries=retries, backoff_s=0.01) as client:
            s = spec(url, "v1")
            await client.scores(s, rows(1))  # first request on the connection: answered
            return await client.scores(s, rows(1))  # second on the same connection: dropped or reset

    server = RawServer(drop_from=2, reset=reset)
    if retries:
        np.testing.assert_array_equal(asyncio.run(main(server)), [[0.25, 0.75]])
        assert server.connections == 2 and server.requests == 2
    else:
        with pytest.raises(UpstreamError) as info:
            asyncio.run(main(server))
        assert info.value.status_code == 502 and "cannot reach upstream" in info.value.message
        assert cause in info.value.message


@pytest.mark.parametrize(("status", "kind", "code"), [(500, UpstreamError, 502), (400, UpstreamRejected, 400),
                                                      (503, UpstreamError, 502)])
def test_async_client_maps_failures_like_the_sync_one(servers, status, kind, code):
    script, s = servers["scripted"], spec(servers["script"], "v1")
    script.run(*[(status, {"error": f"failure {status}"})] * 4)

    async def main():
        async with UpstreamClient(retries=2, backoff_s=0.01) as client:
            await client.scores(s, rows(1))

    with pytest.raises(kind) as info:
        asyncio.run(main())
    assert info.value.status_code == code and info.value.upstream_status == status
    assert f"failure {status}" in info.value.message and servers["script"] in info.value.message
    assert script.calls == (3 if status == 503 else 1)  # only 502/503 are retried


def test_async_client_closes_cleanly_and_refuses_use_after_close(servers):
    async def main():
        client = UpstreamClient()
        await client.aclose()  # never used: nothing to close, no error
        client = UpstreamClient()
        s = spec(servers["v1"], "v1")
        await client.scores(s, rows(2))
        session_ = client._session
        await client.aclose()
        assert session_ is not None and session_.closed
        with pytest.raises(RuntimeError, match="closed"):
            await client.scores(s, rows(2))

    asyncio.run(main())


def test_forward_v2_sends_the_callers_body_as_it_came(servers, session):
    X = rows(4, seed=11)
    s = spec(servers["v2"], model_name="mlp")
    body = json.dumps({"id": "caller-7", "inputs": [{"name": "input", "shape": [4, 5], "datatype": "FP32",
                                                     "data": X.tolist()}]}).encode()  # nested rows, as sent

    async def main():
        async with UpstreamClient() as client:
            return await client.forward_v2(s, body)

    response = asyncio.run(main())
    assert response.id == "caller-7" and response.outputs[0].name == "logits"
    np.testing.assert_array_equal(np.asarray(response.outputs[0].data, np.float32).reshape(4, 2), offline(session, X))
