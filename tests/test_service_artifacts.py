"""Model artifacts (a model version's ONNX file, for gradient and weight access) over a real gateway (uvicorn in
a thread) and a real Redis (REDIS_URL, else embedded): upload, validation, the size limit, download, deletion,
and how jobs are refused when their access kind does not fit the method or the model version."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import httpx
import numpy as np
import onnx
import pytest
from redis.asyncio import Redis

from patcher.onnx_graphs import GraphBuilder, float_tensor, mlp_model
from service.app import create_app
from service.jobs import DEFAULT_QUERY_BUDGET
from service.serve_thread import ServerThread
from service.settings import Settings

KEY = "artifact-admin-key"
LIMIT = 64 * 1024
RUN = uuid.uuid4().hex[:6]
MODEL = f"art-{RUN}"
OCTET = {"content-type": "application/octet-stream"}


def mlp(d: int = 5, hidden: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return mlp_model([(rng.normal(size=(d, hidden)), rng.normal(size=hidden)),
                      (rng.normal(size=(hidden, 2)), rng.normal(size=2))])


def with_opset(data: bytes, opset: int) -> bytes:
    model = onnx.load_from_string(data)
    model.opset_import[0].version = opset
    return model.SerializeToString()


def two_inputs() -> bytes:
    b = GraphBuilder()
    b.op("Add", ["a", "b"], "logits")
    return b.model([float_tensor("a", ["N", 2]), float_tensor("b", ["N", 2])], [float_tensor("logits", ["N", 2])],
                   "two").SerializeToString()


def int_input() -> bytes:
    b = GraphBuilder()
    b.op("Cast", ["x"], "logits", to=onnx.TensorProto.FLOAT)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, ["N", 2])
    return b.model([x], [float_tensor("logits", ["N", 2])], "ints").SerializeToString()


@pytest.fixture(scope="module")
def gateway(redis_url, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                        max_artifact_bytes=LIMIT, job_queue=f"test-art:{RUN}")
    with ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def register(client, name: str = MODEL, version: str = "1") -> dict:
    spec = {"name": name, "version": version, "groups": ["a", "b"],
            "upstream": {"url": "http://127.0.0.1:9", "input_name": "input"}}
    r = client.post("/v1/models", json=spec)
    assert r.status_code in (200, 201), r.text
    return spec


def path(name: str = MODEL, version: str = "1") -> str:
    return f"/v1/models/{name}/versions/{version}/artifact"


def error(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


def redis_get(url: str, key: str) -> bytes | None:
    async def main() -> bytes | None:
        redis = Redis.from_url(url)
        try:
            return await redis.get(key)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_upload_describe_download_delete(client, redis_url):
    spec = register(client)
    data = mlp()
    r = client.post(path(), content=data, headers=OCTET)
    assert r.status_code == 201, r.text
    info = r.json()
    assert r.headers["location"] == path()
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert info["opset"] == 17 and info["input_name"] == "input" and info["input_shape"] == ["N", 5]
    assert info["input_datatype"] == "FP32" and info["output_name"] == "logits" and info["output_shape"] == ["N", 2]
    # recorded in the model version's spec; registering the same spec again keeps it
    assert client.get(f"/v1/models/{MODEL}/versions/1").json()["artifact"] == info
    assert client.post("/v1/models", json=spec).status_code == 200
    assert client.get(f"/v1/models/{MODEL}/versions/1").json()["artifact"] == info
    # metadata by default, the bytes on request (checked against the recorded hash)
    assert client.get(path()).json() == info
    r = client.get(path(), headers={"accept": "application/octet-stream"})
    assert r.status_code == 200 and r.content == data
    assert r.headers["fairpatch-artifact-sha256"] == info["sha256"]
    # stored as the plain bytes, nothing else
    assert redis_get(redis_url, f"fp:artifact:{MODEL}:1") == data
    # a new upload replaces it
    other = mlp(seed=1)
    r = client.post(path(), content=other, headers=OCTET)
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(other).hexdigest()
    assert client.get(path(), headers={"accept": "application/octet-stream"}).content == other

    assert client.delete(path()).status_code == 204
    r = client.get(path())
    assert r.status_code == 404 and "has no artifact" in error(r)
    assert client.get(f"/v1/models/{MODEL}/versions/1").json()["artifact"] is None
    assert redis_get(redis_url, f"fp:artifact:{MODEL}:1") is None
    assert client.delete(path()).status_code == 404


def redis_set(url: str, key: str, value: bytes) -> None:
    async def main() -> None:
        redis = Redis.from_url(url)
        try:
            await redis.set(key, value)
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_bytes_that_no_longer_match_the_recorded_hash_are_never_handed_out(client, redis_url):
    name = f"tampered-{RUN}"
    register(client, name)
    assert client.post(path(name), content=mlp(), headers=OCTET).status_code == 201
    redis_set(redis_url, f"fp:artifact:{name}:1", mlp(seed=7))  # changed behind the gateway's back
    r = client.get(path(name), headers={"accept": "application/octet-stream"})
    assert r.status_code == 409 and "not the recorded" in error(r)


def test_deleting_the_model_version_deletes_its_artifact(client, redis_url):
    name = f"gone-{RUN}"
    register(client, name)
    assert client.post(path(name), content=mlp(), headers=OCTET).status_code == 201
    assert client.delete(f"/v1/models/{name}/versions/1").status_code == 204
    assert redis_get(redis_url, f"fp:artifact:{name}:1") is None
    register(client, name)  # registered anew: no artifact carried over
    assert client.get(path(name)).status_code == 404


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"", OCTET, 400, "empty body"),
    (b"name,income\n1,0\n", OCTET, 400, "not an ONNX model"),
    (b"\x08\x07" + b"\xff" * 40, OCTET, 400, "not an ONNX model"),
    (with_opset(mlp(), 18), OCTET, 400, "opset 18"),
    (two_inputs(), OCTET, 400, "one input"),
    (int_input(), OCTET, 400, "floating-point"),
    (mlp(), {"content-type": "text/csv"}, 415, "application/octet-stream"),
])
def test_bad_artifacts_are_refused_with_a_clear_4xx(client, body, headers, status, message):
    register(client)
    r = client.post(path(), content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in error(r)


def test_a_model_that_onnxruntime_cannot_run_is_refused(client):
    register(client)
    model = onnx.load_from_string(mlp())
    model.graph.node[0].op_type = "NoSuchOp"  # the checker accepts unknown ops only in custom domains; it says
    r = client.post(path(), content=model.SerializeToString(), headers=OCTET)
    assert r.status_code == 400 and ("checker" in error(r) or "onnxruntime" in error(r))


def test_oversize_artifacts_are_413_declared_or_streamed(client):
    register(client)
    big = mlp(d=1200, hidden=16)  # about 77 KB of weights
    assert len(big) > LIMIT
    r = client.post(path(), content=big, headers=OCTET)
    assert r.status_code == 413 and f"{LIMIT}-byte limit" in error(r)

    def chunks():  # no Content-Length: counted as it streams
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = client.post(path(), content=chunks(), headers=OCTET)
    assert r.status_code == 413 and "limit" in error(r)


def test_unknown_model_or_version_is_404(client):
    register(client)
    r = client.post(path("nope"), content=mlp(), headers=OCTET)
    assert r.status_code == 404 and "unknown model 'nope'" in error(r)
    r = client.get(path(MODEL, "9"))
    assert r.status_code == 404 and "version '9'" in error(r)


def test_artifact_routes_need_the_admin_key(gateway):
    r = httpx.post(f"{gateway.url}{path()}", content=mlp(), headers=OCTET)
    assert r.status_code == 401
    assert httpx.get(f"{gateway.url}{path()}").status_code == 401
    assert httpx.delete(f"{gateway.url}{path()}").status_code == 401


# --- jobs: access kinds ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset_id(client) -> str:
    rng = np.random.default_rng(0)
    rows = "\n".join(f"{x[0]:.3f},{x[1]:.3f},{x[2]:.3f},{x[3]:.3f},{x[4]:.3f},{i % 2},{'ab'[i % 3 == 0]}"
                     for i, x in enumerate(rng.normal(size=(60, 5))))
    r = client.post("/v1/datasets", params={"label": "y", "group": "g"}, content=f"f0,f1,f2,f3,f4,y,g\n{rows}\n",
                    headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(dataset_id: str, **extra) -> dict:
    return {"model": MODEL, "version": "1", "method": "eraser", "dataset": dataset_id, "query_budget": 100, **extra}


@pytest.mark.parametrize(("extra", "status", "message"), [
    ({"access": "gradient"}, 400, "method eraser does not support access 'gradient'; it supports: queries"),
    ({"access": "weights"}, 400, "it supports: queries"),
    ({"access": "telepathy"}, 400, "access"),
    ({"exemplar_dataset": "0" * 32}, 400, "method eraser takes no exemplar dataset"),
    ({"options": {"access_kind": "gradient"}}, 400, "unknown option(s) access_kind for eraser; valid options: bias"),
    ({"options": {"exemplar": "x"}}, 400, "unknown option(s) exemplar for eraser"),
])
def test_jobs_whose_access_does_not_fit_the_method_are_refused(client, dataset_id, extra, status, message):
    register(client)
    r = client.post("/v1/jobs", json=job(dataset_id, **extra))
    assert r.status_code == status, r.text
    assert message in error(r)


def test_a_job_records_its_access_kind(client, dataset_id):
    register(client)
    r = client.post("/v1/jobs", json=job(dataset_id))  # no worker serves this queue: it stays queued
    assert r.status_code == 202, r.text
    assert r.json()["access"] == "queries" and r.json()["exemplar_dataset"] is None
    assert client.delete(f"/v1/jobs/{r.json()['id']}").status_code == 202


@pytest.mark.parametrize("budget", [{"query_budget": None}, {}])
def test_a_query_job_without_a_budget_gets_the_documented_default(client, dataset_id, budget):
    """The schema allows a null or missing budget, so the server must not refuse one."""
    register(client)
    body = {k: v for k, v in job(dataset_id).items() if k != "query_budget"}
    r = client.post("/v1/jobs", json={**body, **budget})
    assert r.status_code == 202, r.text
    assert r.json()["query_budget"] == DEFAULT_QUERY_BUDGET and r.json()["access"] == "queries"
    assert client.delete(f"/v1/jobs/{r.json()['id']}").status_code == 202
