"""The data plane end to end: real upstreams and the real gateway on loopback ports, real Redis.

The upstream is the local ONNX server with the Adult reference model; patches are Eraser patches
fitted on the Adult tune split through OnnxOracle, stored and activated with PatchStore. What the
gateway answers must equal the patch applied offline (tests.expected: the patch's own ONNX graph run directly)
to the upstream's raw scores.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request, Response
from redis.asyncio import Redis

from patcher.methods import eraser
from patcher.onnx_graphs import GraphBuilder, float_tensor
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.tuning import TuningData
from service import infer
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.patch_store import PatchStore
from service.redis_embedded import redis_url_for
from service.registry import ModelRegistry, ModelSpec, UpstreamSpec
from service.serve_thread import ServerThread
from service.settings import Settings
from tests.conftest import fit
from tests.expected import patched_scores
from tests.processes import until

BODY_LIMIT = 512 * 1024
UPSTREAM_NAME, UPSTREAM_VERSION = "adult-ref", "3"


def multi_output_model() -> bytes:
    """[N, 5] in; `logits` [N, 2] and an extra output `doubled` = 2 * input that must pass through."""
    rng = np.random.default_rng(1)
    b = GraphBuilder()
    b.mlp("input", [(rng.normal(size=(5, 8)), rng.normal(size=8)), (rng.normal(size=(8, 2)), rng.normal(size=2))],
          "logits")
    b.op("Mul", ["input", b.const(np.array(2.0, dtype=np.float32))], "doubled")
    outputs = [float_tensor("logits", ["N", 2]), float_tensor("doubled", ["N", 5])]
    m = b.model([float_tensor("input", ["N", 5])], outputs, "multi")
    return m.SerializeToString()


def table_patch() -> Patch:
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    graph = eraser.build_output_graph(5, 2, alpha=1.0, threshold=0.25, bias="group", table=table)
    return Patch.build(method="eraser", n_classes=2, groups=["a", "b"], group_at_inference=True,
                       output_transform=graph)


def scripted_v2_app(metadata: dict, infer) -> FastAPI:
    """A V2 server that answers metadata at once and inference with `await infer(name)`."""
    app = FastAPI()

    @app.get("/v2/models/{name}/versions/{version}")
    async def meta(name: str, version: str):
        return metadata

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def answer(name: str, version: str):
        return await infer(name)

    return app


def slow_app(metadata: dict, delay_s: float) -> FastAPI:
    """Answers metadata at once and inference after `delay_s` (longer than the model's timeout)."""
    async def slow(name: str):
        await asyncio.sleep(delay_s)
        return {"model_name": name, "outputs": []}

    return scripted_v2_app(metadata, slow)


def binary_only(app: FastAPI) -> FastAPI:
    """The upstream app refusing inference requests whose tensors are not binary data: proof that a leg
    registered `binary_data` really sends them so."""
    @app.middleware("http")
    async def refuse_json(request: Request, call_next):
        if request.method == "POST" and "inference-header-content-length" not in request.headers:
            return Response(b'{"error": "binary tensor data only"}', status_code=415, media_type="application/json")
        return await call_next(request)

    return app


def garbled_binary_app(metadata: dict) -> FastAPI:
    """A V2 server whose binary answers do not add up: its Inference-Header-Content-Length points past
    the body."""
    async def garbled(name: str):
        header = json.dumps({"model_name": name, "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}).encode()
        return Response(header + b"\0" * 4, media_type="application/octet-stream",
                        headers={"inference-header-content-length": str(len(header))})

    return scripted_v2_app(metadata, garbled)


def mlflow_app(model: bytes) -> FastAPI:
    """`mlflow models serve` in miniature: {"inputs": rows} -> {"predictions": logits}."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/invocations")
    async def invocations(request: Request):
        X = np.asarray((await request.json())["inputs"], dtype=np.float32)
        return {"predictions": session.run(None, {"input": X})[0].tolist()}

    return app


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_call(url: str, body) -> None:
    async def main():
        redis = Redis.from_url(url)
        try:
            await body(ModelRegistry(redis), PatchStore(redis))
        finally:
            await redis.aclose()

    asyncio.run(main())


@pytest.fixture(scope="module")
def world(tmp_path_factory, adult, adult_model):
    tmp = tmp_path_factory.mktemp("infer")
    sfx = uuid.uuid4().hex[:6]  # models of our own on a possibly shared Redis
    tune = TuningData(adult.tune.X, adult.tune.y, adult.tune.groups, adult.group_names)
    group_patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="group")
    free_patch, _ = fit("eraser", OnnxOracle(adult_model.onnx_bytes, budget=300), tune, "dp", 300, bias="estimator")
    assert group_patch.group_at_inference and not free_patch.group_at_inference
    onnx_model = OnnxModel(adult_model.onnx_bytes, name=UPSTREAM_NAME, version=UPSTREAM_VERSION)
    names = SimpleNamespace(adult=f"adult-{sfx}", free=f"free-{sfx}", multi=f"multi-{sfx}", down=f"down-{sfx}",
                            slow=f"slow-{sfx}", toggle=f"toggle-{sfx}", moving=f"moving-{sfx}",
                            mlflow=f"mlflow-{sfx}", binary=f"binary-{sfx}", multi_binary=f"multibin-{sfx}",
                            garbled=f"garbled-{sfx}")
    with redis_url_for(os.environ.get("REDIS_URL"), tmp / "redis") as redis_url, \
            ServerThread(create_upstream_app(onnx_model)) as up, \
            ServerThread(create_upstream_app(OnnxModel(multi_output_model(), name="multi"))) as multi_up, \
            ServerThread(slow_app(onnx_model.metadata.model_dump(exclude_none=True), 1.0)) as slow_up, \
            ServerThread(mlflow_app(adult_model.onnx_bytes)) as mlflow_up, \
            ServerThread(garbled_binary_app(onnx_model.metadata.model_dump(exclude_none=True))) as garbled_up, \
            ServerThread(binary_only(create_upstream_app(onnx_model))) as binary_up, \
            ServerThread(binary_only(create_upstream_app(OnnxModel(multi_output_model(), name="multi")))) \
            as multi_binary_up:
        adult_up = UpstreamSpec(url=up.url, model_name=UPSTREAM_NAME, model_version=UPSTREAM_VERSION,
                                output_name="logits")
        specs = [
            ModelSpec(name=names.adult, version="1", upstream=adult_up),  # unpatched
            ModelSpec(name=names.adult, version="2", upstream=adult_up, groups=list(adult.group_names)),
            ModelSpec(name=names.free, version="1", upstream=adult_up),
            ModelSpec(name=names.multi, version="1", upstream=UpstreamSpec(url=multi_up.url, model_name="multi")),
            ModelSpec(name=names.down, version="1",
                      upstream=adult_up.model_copy(update={"url": f"http://127.0.0.1:{closed_port()}"})),
            ModelSpec(name=names.slow, version="1",
                      upstream=adult_up.model_copy(update={"url": slow_up.url, "timeout_s": 0.5})),
            ModelSpec(name=names.toggle, version="1", upstream=adult_up),
            ModelSpec(name=names.mlflow, version="1", upstream=UpstreamSpec(url=mlflow_up.url, protocol="mlflow",
                                                                             output_name="logits")),
            ModelSpec(name=names.binary, version="1",
                      upstream=adult_up.model_copy(update={"url": binary_up.url, "binary_data": True})),
            ModelSpec(name=names.multi_binary, version="1",
                      upstream=UpstreamSpec(url=multi_binary_up.url, model_name="multi", binary_data=True)),
            ModelSpec(name=names.garbled, version="1",
                      upstream=adult_up.model_copy(update={"url": garbled_up.url, "binary_data": True})),
        ]
        patches = {(names.adult, "2"): group_patch.for_model(names.adult, "2"),
                   (names.free, "1"): free_patch.for_model(names.free, "1"),
                   (names.multi, "1"): table_patch().for_model(names.multi, "1"),
                   (names.toggle, "1"): group_patch.for_model(names.toggle, "1"),
                   (names.mlflow, "1"): group_patch.for_model(names.mlflow, "1"),
                   (names.binary, "1"): group_patch.for_model(names.binary, "1"),
                   (names.multi_binary, "1"): table_patch().for_model(names.multi_binary, "1")}

        async def register(registry, store):
            for s in specs:
                await registry.put(s)
            for (m, v), p in patches.items():
                await store.put(p)
                if m != names.toggle:
                    await store.activate(m, v, p.id)

        redis_call(redis_url, register)
        settings = Settings(data_dir=tmp / "gw", redis_url=redis_url, patch_recheck_s=0.2, max_body_bytes=BODY_LIMIT)
        app = create_app(settings)
        try:
            with ServerThread(app) as gw, httpx.Client(base_url=gw.url, timeout=10) as client, \
                    httpx.Client(base_url=up.url, timeout=10) as upstream:
                yield SimpleNamespace(client=client, upstream=upstream, gateway_url=gw.url, redis_url=redis_url,
                                      names=names, patches=patches, adult=adult, upstream_url=up.url)
        finally:
            async def unregister(registry, store):
                for s in specs:
                    await registry.delete(s.name, s.version)
                for m, v in patches:
                    await store.deactivate(m, v)
                await registry.delete(names.moving, "1")

            redis_call(redis_url, unregister)


# --- helpers -------------------------------------------------------------------------------------------

def batch(world, n: int = 40, start: int = 0):
    X = world.adult.test.X[start:start + n].astype(np.float32)
    ids = world.adult.test.groups[start:start + n]
    return X, ids, [world.adult.group_names[i] for i in ids]


def body(X: np.ndarray, groups=None, *, group_datatype: str = "BYTES", **extra) -> dict:
    inputs = [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]
    if groups is not None:
        inputs.append({"name": "group", "shape": [len(groups)], "datatype": group_datatype, "data": list(groups)})
    return {"inputs": inputs, **extra}


def upstream_raw(world, X: np.ndarray) -> np.ndarray:
    r = world.upstream.post(f"/v2/models/{UPSTREAM_NAME}/versions/{UPSTREAM_VERSION}/infer", json=body(X))
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def offline(patch: Patch, X: np.ndarray, raw: np.ndarray, groups=None) -> np.ndarray:
    """The patch applied offline to the upstream's raw logits from its own definition (tests.expected: its ONNX
    graph run directly, no code of the gateway's or of patcher.apply)."""
    return patched_scores(patch, X, raw, groups)


def output(response: httpx.Response, name: str) -> np.ndarray:
    for o in response.json()["outputs"]:
        if o["name"] == name:
            return np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
    raise AssertionError(f"no output {name} in {response.text[:300]}")


def assert_serving(world) -> None:
    """A good request still gets a correct answer."""
    X, ids, _ = batch(world, 3, start=100)
    r = world.client.post(f"/v2/models/{world.names.adult}/versions/1/infer", json=body(X))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(output(r, "logits"), upstream_raw(world, X))


# --- metadata and readiness ----------------------------------------------------------------------------

def test_metadata_is_the_upstreams_plus_the_group_input_the_patch_needs(world):
    m = world.names.adult
    r = world.client.get(f"/v2/models/{m}/versions/2")
    assert r.status_code == 200, r.text
    meta, pid = r.json(), world.patches[(m, "2")].id
    assert meta["name"] == m and meta["versions"] == ["2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 103]},
                              {"name": "group", "datatype": "BYTES", "shape": [-1],
                               "parameters": {"groups": ["Female", "Male"]}}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["parameters"] == {"fairpatch_patch": pid, "fairpatch_served_by": "upstream"}
    assert r.headers["fairpatch-patch"] == pid and r.headers["fairpatch-served-by"] == "upstream"
    assert world.client.get(f"/v2/models/{m}").json() == meta  # no version: the latest (2)

    unpatched = world.client.get(f"/v2/models/{m}/versions/1").json()
    assert [t["name"] for t in unpatched["inputs"]] == ["input"]
    assert unpatched["parameters"] == {"fairpatch_patch": None, "fairpatch_served_by": "upstream"}
    free = world.client.get(f"/v2/models/{world.names.free}").json()  # group-free patch: no group input
    assert [t["name"] for t in free["inputs"]] == ["input"]
    assert free["parameters"]["fairpatch_patch"] == world.patches[(world.names.free, "1")].id


@pytest.mark.parametrize("path", ["/ready", "/versions/1/ready", "/versions/2/ready"])
def test_model_ready_when_registered(world, path):
    r = world.client.get(f"/v2/models/{world.names.adult}{path}")
    assert r.status_code == 200 and r.json() == {"name": world.names.adult, "ready": True}


# --- patched inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group_datatype", ["BYTES", "INT64"])
@pytest.mark.parametrize("path", ["/versions/2/infer", "/infer"])
def test_patched_scores_equal_the_patch_applied_offline(world, path, group_datatype):
    m = world.names.adult
    X, ids, names = batch(world, 60)
    groups = names if group_datatype == "BYTES" else ids.tolist()
    r = world.client.post(f"/v2/models/{m}{path}", json=body(X, groups, group_datatype=group_datatype, id="req-7"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == m and doc["model_version"] == "2" and doc["id"] == "req-7"
    assert r.headers["fairpatch-patch"] == world.patches[(m, "2")].id
    raw = upstream_raw(world, X)
    expected = offline(world.patches[(m, "2")], X, raw, ids)
    got = output(r, "logits")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, raw)  # the patch did something
    assert [o["name"] for o in doc["outputs"]] == ["logits"] and doc["outputs"][0]["datatype"] == "FP32"


def test_raw_scores_on_request(world):
    m = world.names.adult
    X, ids, names = batch(world, 20, start=7)
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X, names, parameters={"fairpatch_raw": True}))
    assert r.status_code == 200, r.text
    raw = upstream_raw(world, X)
    assert [o["name"] for o in r.json()["outputs"]] == ["logits", "fairpatch_raw"]
    np.testing.assert_array_equal(output(r, "fairpatch_raw"), raw)
    np.testing.assert_allclose(output(r, "logits"), offline(world.patches[(m, "2")], X, raw, ids), atol=1e-5)


def test_no_patch_answers_exactly_what_the_upstream_answers(world):
    X, _, names = batch(world, 25, start=3)
    r = world.client.post(f"/v2/models/{world.names.adult}/versions/1/infer", json=body(X, names))  # group ignored
    assert r.status_code == 200, r.text
    assert r.headers["fairpatch-patch"] == "none"
    np.testing.assert_array_equal(output(r, "logits"), upstream_raw(world, X))


def test_a_group_free_patch_needs_no_group(world):
    key = (world.names.free, "1")
    X, _, _ = batch(world, 30, start=11)
    r = world.client.post(f"/v2/models/{world.names.free}/infer", json=body(X))
    assert r.status_code == 200, r.text
    assert r.headers["fairpatch-patch"] == world.patches[key].id
    raw = upstream_raw(world, X)
    np.testing.assert_allclose(output(r, "logits"), offline(world.patches[key], X, raw), atol=1e-5)


def test_other_upstream_outputs_pass_through_and_requested_outputs_are_honoured(world):
    m, key = world.names.multi, (world.names.multi, "1")
    X = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    groups = ["a", "b", "b", "a", "a", "b"]
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X, groups))
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["logits", "doubled"]
    np.testing.assert_array_equal(output(r, "doubled"), 2 * X)  # untouched
    with httpx.Client(base_url=world.client.base_url) as c:
        meta = c.get(f"/v2/models/{m}").json()
    assert [t["name"] for t in meta["outputs"]] == ["logits", "doubled"]
    raw_r = world.client.post(f"/v2/models/{m}/infer", json=body(X, groups, parameters={"fairpatch_raw": True}))
    raw = output(raw_r, "fairpatch_raw")
    np.testing.assert_allclose(output(r, "logits"), offline(world.patches[key], X, raw, np.array(groups)), atol=1e-5)
    only = world.client.post(f"/v2/models/{m}/infer", json=body(X, groups, outputs=[{"name": "doubled"}]))
    assert [o["name"] for o in only.json()["outputs"]] == ["doubled"]
    only = world.client.post(f"/v2/models/{m}/infer", json=body(X, groups, outputs=[{"name": "logits"}]))
    np.testing.assert_allclose(output(only, "logits"), output(r, "logits"))


def test_v1_predict(world):
    m = world.names.adult
    X, ids, names = batch(world, 15, start=20)
    r = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist(), "groups": names})
    assert r.status_code == 200, r.text
    assert r.headers["fairpatch-patch"] == world.patches[(m, "2")].id  # the latest version is patched
    expected = offline(world.patches[(m, "2")], X, upstream_raw(world, X), ids)
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), expected, atol=1e-5)
    r = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist(), "groups": ids.tolist()})
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), expected, atol=1e-5)
    r = world.client.post(f"/v1/models/{world.names.free}:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text
    expected = offline(world.patches[(world.names.free, "1")], X, upstream_raw(world, X))
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), expected, atol=1e-5)


def test_an_mlflow_upstream_behind_both_front_doors(world):
    m, key = world.names.mlflow, (world.names.mlflow, "1")
    X, ids, names = batch(world, 20, start=30)
    expected = offline(world.patches[key], X, upstream_raw(world, X), ids)
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X, names, parameters={"fairpatch_raw": True}))
    assert r.status_code == 200, r.text
    assert r.headers["fairpatch-patch"] == world.patches[key].id
    np.testing.assert_allclose(output(r, "logits"), expected, atol=1e-5)
    np.testing.assert_allclose(output(r, "fairpatch_raw"), upstream_raw(world, X), atol=1e-6)
    r = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist(), "groups": names})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), expected, atol=1e-5)
    meta = world.client.get(f"/v2/models/{m}").json()  # synthesised: MLflow has no metadata endpoint
    assert [t["name"] for t in meta["inputs"]] == ["input", "group"] and meta["outputs"][0]["name"] == "logits"
    assert world.client.post(f"/v2/models/{m}/infer", json=body(X)).status_code == 400  # the patch needs groups


def test_activation_and_deactivation_reach_the_gateway_without_a_restart(world):
    m = world.names.toggle
    X, ids, names = batch(world, 5)
    url, pid = f"/v2/models/{m}/infer", world.patches[(m, "1")].id

    def header_becomes(value: str) -> httpx.Response:
        def served() -> httpx.Response | None:
            r = world.client.post(url, json=body(X, names))
            return r if r.headers.get("fairpatch-patch") == value else None

        return until(served, f"the gateway to serve patch {value}")

    header_becomes("none")

    async def activate(_registry, store):
        await store.activate(m, "1", pid)

    redis_call(world.redis_url, activate)
    r = header_becomes(pid)
    np.testing.assert_allclose(output(r, "logits"), offline(world.patches[(m, "1")], X, upstream_raw(world, X), ids),
                               atol=1e-5)

    async def deactivate(_registry, store):
        await store.deactivate(m, "1")

    redis_call(world.redis_url, deactivate)
    header_becomes("none")


def test_a_changed_registration_is_seen_within_the_cache_ttl(world, monkeypatch):
    monkeypatch.setattr(infer, "SPEC_TTL_S", 0.2)
    m = world.names.moving
    dead = ModelSpec(name=m, version="1", upstream=UpstreamSpec(url=f"http://127.0.0.1:{closed_port()}"))
    redis_call(world.redis_url, lambda registry, _store: registry.put(dead))
    X, _, _ = batch(world, 2)
    assert world.client.post(f"/v2/models/{m}/infer", json=body(X)).status_code == 502
    alive = dead.model_copy(update={"upstream": UpstreamSpec(url=world.upstream_url, model_name=UPSTREAM_NAME)})
    redis_call(world.redis_url, lambda registry, _store: registry.put(alive))
    r = until(lambda: (r := world.client.post(f"/v2/models/{m}/infer", json=body(X))).status_code == 200 and r,
              "the gateway to see the new registration")
    np.testing.assert_array_equal(output(r, "logits"), upstream_raw(world, X))


def test_the_signature_worked_out_once_follows_the_registrations_upstream():
    """What the template derives from an upstream's metadata is kept with it: valid while the registration's upstream
    is equal (a re-read registration then keeps it, by identity from there on), refetched once it is not."""
    from service.oip import MetadataTensor, ModelMetadata

    meta = ModelMetadata(name="m", platform="onnx", inputs=[MetadataTensor(name="x", datatype="FP32", shape=[-1, 3])],
                         outputs=[MetadataTensor(name="label", datatype="INT64", shape=[-1]),
                                  MetadataTensor(name="probs", datatype="FP32", shape=[-1, 2])])
    upstream = UpstreamSpec(url="http://127.0.0.1:9", output_name="probs")
    sig = infer.Signature(upstream, meta)
    assert (sig.feature_name, sig.scores_name) == ("x", "probs") and list(sig.declared) == ["x"]
    assert [o.name for o in sig.default_outputs] == ["label", "probs"]
    assert [o.name for o in sig.outputs_for(["label"])] == ["label", "probs"]  # the scores always asked for
    reread = upstream.model_copy()
    assert reread is not upstream and sig.serves(reread) and sig.upstream is reread
    assert not sig.serves(upstream.model_copy(update={"output_name": "label"}))
    assert not sig.serves(upstream.model_copy(update={"url": "http://127.0.0.1:10"}))
    plain = infer.Signature(UpstreamSpec(url="http://127.0.0.1:9", input_name="x"), meta)
    assert (plain.feature_name, plain.scores_name) == ("x", "label")  # unnamed: the metadata's first


# --- Triton's own client --------------------------------------------------------------------------------

def test_tritonclient_reads_health_metadata_and_infers(world):
    import tritonclient.http as triton

    m = world.names.adult
    X, ids, names = batch(world, 12, start=50)
    expected = offline(world.patches[(m, "2")], X, upstream_raw(world, X), ids)
    client = triton.InferenceServerClient(url=world.gateway_url.removeprefix("http://"))
    try:
        # not ready: one of this world's upstreams is down (names.down), and readiness asks every upstream
        assert client.is_server_live() and not client.is_server_ready()
        assert client.is_model_ready(m) and client.is_model_ready(m, "1")
        meta = client.get_model_metadata(m)
        assert [t["name"] for t in meta["inputs"]] == ["input", "group"]
        assert meta["parameters"]["fairpatch_patch"] == world.patches[(m, "2")].id
        for binary in (False, True):  # JSON tensors, then the binary tensor extension (the client's default)
            features = triton.InferInput("input", list(X.shape), "FP32")
            features.set_data_from_numpy(X, binary_data=binary)
            group = triton.InferInput("group", [len(names)], "BYTES")
            group.set_data_from_numpy(np.array([n.encode() for n in names], dtype=np.object_), binary_data=binary)
            outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
            result = client.infer(m, [features, group], model_version="2", outputs=outputs if binary else None)
            np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    finally:
        client.close()


# --- the binary tensor extension on the upstream leg ------------------------------------------------------

def binary_body(X: np.ndarray, groups: list[str] | None, *, outputs: list[str] | None = None,
                **parameters) -> tuple[bytes, dict[str, str]]:
    """A V2 request with its tensors as binary data (what tritonclient sends by default)."""
    from service import binary_tensors

    header: dict = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32"}]}
    tensors = [(header["inputs"][0], X)]
    if groups is not None:
        header["inputs"].append({"name": "group", "shape": [len(groups)], "datatype": "BYTES"})
        tensors.append((header["inputs"][1], np.array(groups, dtype=object)))
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    if parameters:
        header["parameters"] = parameters
    data, n = binary_tensors.pack(header, tensors)
    return data, {"inference-header-content-length": str(n)}


def binary_outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    from service import binary_tensors

    assert r.headers["content-type"] == binary_tensors.CONTENT_TYPE, r.text[:300]
    doc, blob = binary_tensors.split(r.content, r.headers["inference-header-content-length"])
    binary_tensors.attach(doc["outputs"], blob, "output")
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in doc["outputs"]}


def test_an_upstream_registered_binary_gets_binary_tensors_and_the_same_answers(world):
    """The gateway sends the binary model's upstream (which refuses JSON tensors) binary tensors and reads its
    binary answers; callers see the same JSON as through a JSON upstream leg, patched the same way."""
    X, _, names = batch(world, 40, start=200)
    expected = offline(world.patches[(world.names.binary, "1")], X, upstream_raw(world, X), names)
    for extra in ({}, {"parameters": {"fairpatch_raw": True}}, {"outputs": [{"name": "logits"}]}):
        doc = body(X, names, **extra)
        via_binary = world.client.post(f"/v2/models/{world.names.binary}/versions/1/infer", json=doc)
        via_json = world.client.post(f"/v2/models/{world.names.adult}/versions/2/infer", json=doc)
        assert via_binary.status_code == 200 and via_json.status_code == 200, via_binary.text
        np.testing.assert_allclose(output(via_binary, "logits"), expected, atol=1e-5)
        np.testing.assert_array_equal(output(via_binary, "logits"), output(via_json, "logits"))
        assert [o["name"] for o in via_binary.json()["outputs"]] == [o["name"] for o in via_json.json()["outputs"]]
        if extra.get("parameters"):
            np.testing.assert_array_equal(output(via_binary, "fairpatch_raw"), upstream_raw(world, X))


def test_other_upstream_outputs_pass_through_a_binary_leg(world):
    """A two-output model behind a binary leg: the patched scores and the untouched extra output."""
    m = world.names.multi_binary
    X = np.random.default_rng(5).normal(size=(6, 5)).astype(np.float32)
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X, ["a", "b", "a", "a", "b", "b"]))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(output(r, "doubled"), 2 * X, rtol=1e-6)
    # the values, in closed form: the model's logits (its ONNX run here) to log-probabilities, minus the table
    # patch's row for the group, plus its shift of the binary cut to 0.25
    import onnxruntime as ort

    logits = ort.InferenceSession(multi_output_model(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": X})[0].astype(np.float64)
    logp = logits - np.logaddexp(logits[:, :1], logits[:, 1:])
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))[[0, 1, 0, 0, 1, 1]]
    np.testing.assert_allclose(output(r, "logits"), logp - table + [0.0, -0.25], rtol=1e-5, atol=1e-5)
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X, ["a"] * 6, outputs=[{"name": "doubled"}]))
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["doubled"], r.text


def test_the_gateway_answers_binary_outputs_when_asked(world):
    """Binary in, binary out (Triton's rules): the values equal the JSON answer's."""
    m = world.names.adult
    X, _, names = batch(world, 25, start=300)
    want = output(world.client.post(f"/v2/models/{m}/versions/2/infer", json=body(X, names)), "logits")
    for kwargs in ({"outputs": ["logits"]}, {"binary_data_output": True}):
        data, headers = binary_body(X, names, **kwargs)
        r = world.client.post(f"/v2/models/{m}/versions/2/infer", content=data, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["fairpatch-patch"] == world.patches[(m, "2")].id
        np.testing.assert_array_equal(binary_outputs(r)["logits"], want)
    data, headers = binary_body(X, names)  # binary in, no binary output asked: JSON out
    r = world.client.post(f"/v2/models/{m}/versions/2/infer", content=data, headers=headers)
    assert r.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(output(r, "logits"), want)


def test_an_unreadable_binary_answer_is_a_502_with_the_cause(world):
    X, _, _ = batch(world, 1)
    r = world.client.post(f"/v2/models/{world.names.garbled}/versions/1/infer", json=body(X))
    assert r.status_code == 502, r.text
    assert "unreadable binary inference response" in r.json()["error"] and "binary_data_size" in r.json()["error"]
    assert_serving(world)


# --- bad input: 4xx {"error"}, and the gateway keeps serving ---------------------------------------------

def _one(**over) -> dict:
    t = {"name": "input", "shape": [1, 103], "datatype": "FP32", "data": [0.0] * 103}
    g = {"name": "group", "shape": [1], "datatype": "BYTES", "data": ["Female"]}
    return {"inputs": [{**t, **over}, g]}


def _group(**over) -> dict:
    doc = _one()
    doc["inputs"][1].update(over)
    return doc


BAD = {
    "malformed json": ("/versions/2/infer", b'{"inputs": [', 400, "malformed JSON"),
    "empty body": ("/versions/2/infer", b"", 400, "empty"),
    "wrong width": ("/versions/2/infer", _one(shape=[1, 102], data=[0.0] * 102), 400, "model expects [-1, 103]"),
    "count mismatch": ("/versions/2/infer", _one(shape=[2, 103]), 400, "needs 206 values, got 103"),
    "wrong rank": ("/versions/2/infer", _one(shape=[103]), 400, "model expects [-1, 103]"),
    "wrong datatype": ("/versions/2/infer", _one(datatype="FP64"), 400, "datatype FP64; model expects FP32"),
    "unknown datatype": ("/versions/2/infer", _one(datatype="FLOAT"), 400, "datatype"),
    "NaN": ("/versions/2/infer", json.dumps(_one(data=[float("nan")] * 103)).encode(), 400, "NaN"),
    "Infinity": ("/versions/2/infer", json.dumps(_one(data=[float("inf")] * 103)).encode(), 400, "infinite"),
    "unknown input": ("/versions/2/infer", _one(name="features"), 400, "no input 'features'"),
    "unknown output": ("/versions/2/infer", {**_one(), "outputs": [{"name": "probs"}]}, 400, "no output"),
    "unknown model": ("!/v2/models/nope-{sfx}/infer", _one(), 404, "unknown model 'nope-"),
    "unknown version": ("/versions/9/infer", _one(), 404, "has no version '9'"),
    "unknown model metadata": ("!/v2/models/nope-{sfx}", None, 404, "unknown model"),
    "unknown version ready": ("/versions/9/ready", None, 404, "has no version '9'"),
    "oversize body": ("/versions/2/infer", b'{"inputs": []}' + b" " * BODY_LIMIT, 413, "limit"),
    "unknown group": ("/versions/2/infer", _group(data=["Other"]), 400, "unknown group 'Other'"),
    "unknown group id": ("/versions/2/infer", _group(datatype="INT64", data=[5]), 400, "unknown group id 5"),
    "missing group": ("/versions/2/infer", {"inputs": _one()["inputs"][:1]}, 400, "needs every row's group"),
    "group count": ("/versions/2/infer", _group(shape=[2], data=["Male", "Male"]), 400, "2 values for 1 rows"),
    "group datatype": ("/versions/2/infer", _group(datatype="FP32", data=[1.0]), 400, "BYTES group names"),
    "only the group": ("/versions/2/infer", {"inputs": _one()["inputs"][1:]}, 400, "no feature input"),
    "v1 malformed": ("!/v1/models/{adult}:predict", b"{", 400, "malformed JSON"),
    "v1 ragged": ("!/v1/models/{adult}:predict", {"instances": [[1.0, 2.0], [3.0]], "groups": ["Male"] * 2}, 400,
                  "rows of numbers"),
    "v1 wrong width": ("!/v1/models/{adult}:predict", {"instances": [[1.0, 2.0]], "groups": ["Male"]}, 400,
                       "model expects [-1, 103]"),
    "v1 NaN": ("!/v1/models/{adult}:predict", b'{"instances": [[NaN]], "groups": ["Male"]}', 400, "NaN"),
    "v1 missing groups": ("!/v1/models/{adult}:predict", {"instances": [[0.0] * 103]}, 400, "needs every row's"),
    "v1 unknown group": ("!/v1/models/{adult}:predict", {"instances": [[0.0] * 103], "groups": ["X"]}, 400,
                         "unknown group 'X'"),
    "v1 unknown model": ("!/v1/models/nope-{sfx}:predict", {"instances": [[0.0]]}, 404, "unknown model"),
    "v1 group id past 64 bits": ("!/v1/models/{adult}:predict", {"instances": [[0.0] * 103], "groups": [2**64]},
                                 400, "outside the INT64 range"),
    "v1 group id 2**63": ("!/v1/models/{adult}:predict", {"instances": [[0.0] * 103], "groups": [2**63]}, 400,
                          "outside the INT64 range"),
    "group id 2**63": ("/versions/2/infer", _group(datatype="INT64", data=[2**63]), 400, "outside the INT64 range"),
    "true as FP32": ("/versions/2/infer", _one(data=[True] + [0.0] * 102), 400, "FP32 data holds true/false"),
    "v1 true as a number": ("!/v1/models/{adult}:predict", {"instances": [[0.0] * 102 + [False]], "groups": ["Male"]},
                            400, "FP32 data holds true/false"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_json_error_and_the_gateway_keeps_serving(world, case):
    path, payload, status, message = BAD[case]
    sfx = uuid.uuid4().hex[:6]
    path = path[1:].format(sfx=sfx, adult=world.names.adult) if path.startswith("!") \
        else f"/v2/models/{world.names.adult}{path}"
    if payload is None:
        r = world.client.get(path)
    elif isinstance(payload, bytes):
        r = world.client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = world.client.post(path, json=payload)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"], r.json()
    assert_serving(world)


def test_binary_data_that_does_not_add_up_is_a_400(world):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 103], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 412}}]}).encode()
    path = f"/v2/models/{world.names.adult}/versions/1/infer"
    r = world.client.post(path, content=header + b"\0" * 100, headers={"inference-header-content-length":
                                                                        str(len(header))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    r = world.client.post(path, content=header + b"\0" * 420, headers={"inference-header-content-length":
                                                                        str(len(header))})
    assert r.status_code == 400 and "belong to no input" in r.json()["error"]
    r = world.client.post(path, content=header, headers={"inference-header-content-length": "x"})
    assert r.status_code == 400 and "integer" in r.json()["error"]
    assert_serving(world)


# --- upstream failures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/infer", "", ":predict"])
def test_upstream_down_is_a_502_naming_the_cause(world, path):
    m = world.names.down
    X, _, _ = batch(world, 2)
    if path == ":predict":
        r = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist()})
    elif path:
        r = world.client.post(f"/v2/models/{m}{path}", json=body(X))
    else:
        r = world.client.get(f"/v2/models/{m}")  # metadata comes from the upstream too
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert "cannot reach upstream http://127.0.0.1:" in error and "Connect" in error
    assert_serving(world)


def test_upstream_too_slow_is_a_504(world):
    m = world.names.slow
    X, _, _ = batch(world, 2)
    assert world.client.get(f"/v2/models/{m}").status_code == 200  # metadata answers at once
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X))  # the answer would take 1 s
    assert r.status_code == 504, r.text
    assert "did not answer within 0.5s" in r.json()["error"]
    assert_serving(world)


def test_concurrent_requests_are_all_answered_correctly(world):
    from concurrent.futures import ThreadPoolExecutor

    m = world.names.adult
    raws = {}

    def call(start: int):
        X, ids, names = batch(world, 10, start=start)
        r = world.client.post(f"/v2/models/{m}/infer", json=body(X, names))
        return X, ids, output(r, "logits")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(0, 320, 10)))
    for X, ids, got in results:
        raws[len(raws)] = upstream_raw(world, X)
        np.testing.assert_allclose(got, offline(world.patches[(m, "2")], X, raws[len(raws) - 1], ids), atol=1e-5)


# --- the in-process cache ---------------------------------------------------------------------------------

def test_ttl_cache_loads_once_expires_and_serves_stale_values_when_a_reload_fails():
    now = [0.0]

    async def main():
        cache, calls = infer.TtlCache(clock=lambda: now[0]), []

        async def load():
            calls.append(1)
            await asyncio.sleep(0.01)
            return len(calls)

        async def fail():
            raise RuntimeError("redis went away")

        assert await asyncio.gather(*[cache.get("k", load, lambda _v: 0.05) for _ in range(20)]) == [1] * 20
        assert len(calls) == 1  # twenty concurrent misses, one load
        now[0] = 0.04
        assert await cache.get("k", load, lambda _v: 0.05) == 1 and cache.fresh("k") == 1
        now[0] = 0.06
        assert cache.fresh("k") is None
        assert await cache.get("k", fail, lambda _v: 0.05) == 1  # expired, reload failed: the last value
        assert await cache.get("k", load, lambda _v: 10, valid=lambda v: v != 1) == 2  # invalid: reloaded
        cache.forget(lambda k: k == "k")
        with pytest.raises(RuntimeError, match="went away"):
            await cache.get("k", fail, lambda _v: 1)  # nothing to fall back on

    asyncio.run(main())


def test_ttl_cache_serves_the_expired_value_while_a_reload_hangs():
    """A reload Redis does not answer (a cut link: the client waits out its socket timeout) does not stall
    requests: the first caller waits STALE_WAIT_S at most, the others not at all; the reload lands later."""
    now = [0.0]

    async def main():
        cache = infer.TtlCache(clock=lambda: now[0])
        answer = asyncio.Event()

        async def one():
            return 1

        async def hanging():
            await answer.wait()
            return 2

        assert await cache.get("k", one, lambda _v: 1.0) == 1
        now[0] = 2.0  # expired
        assert await cache.get("k", hanging, lambda _v: 1.0) == 1  # waited STALE_WAIT_S, then the old value
        assert await asyncio.gather(*[cache.get("k", hanging, lambda _v: 1.0) for _ in range(5)]) == [1] * 5
        answer.set()
        for _ in range(100):  # the reload that went on behind lands (a few loop turns)
            if cache.fresh("k") == 2:
                break
            await asyncio.sleep(0)
        assert cache.fresh("k") == 2 and await cache.get("k", hanging, lambda _v: 1.0) == 2

    asyncio.run(main())


# --- the same rules both ways: content types, empty batches, what the upstream sends back -------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.parametrize("path", ["/v2/models/{adult}/versions/2/infer", "/v1/models/{adult}:predict"])
def test_bodies_that_are_not_json_are_415(world, path, content_type):
    path = path.format(adult=world.names.adult)
    doc = _one() if "/v2/" in path else {"instances": [[0.0] * 103], "groups": ["Male"]}
    r = world.client.post(path, content=json.dumps(doc).encode(), headers={"content-type": content_type})
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]
    ok = world.client.post(path, content=json.dumps(doc).encode(),
                           headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("model", "version"), [("adult", "1"), ("adult", "2"), ("free", "1")])
def test_an_empty_batch_is_answered_empty_patched_or_not(world, model, version):
    m = getattr(world.names, model)
    doc = {"inputs": [{"name": "input", "shape": [0, 103], "datatype": "FP32", "data": []},
                      {"name": "group", "shape": [0], "datatype": "BYTES", "data": []}]}
    r = world.client.post(f"/v2/models/{m}/versions/{version}/infer", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [0, 2], "data": []}]
    patch = world.patches.get((m, version))
    assert r.headers["fairpatch-patch"] == (patch.id if patch else "none")


BAD_ANSWERS = {  # upstream model name -> its inference answer (raw bytes), and what the 502 says
    "nan": (b'{"model_name": "nan", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], '
            b'"data": [NaN, 1.0]}]}', "NaN"),
    "infinity": (b'{"model_name": "infinity", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], '
                 b'"data": [Infinity, 1.0]}]}', "infinite"),
    "five": (b'{"model_name": "five", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 2], '
             b'"data": [1, 2, 3, 4, 5]}]}', "needs 4 values, got 5"),
    "strings": (b'{"model_name": "strings", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], '
                b'"data": ["a", "b"]}]}', "not a valid FP32"),
    "bools": (b'{"model_name": "bools", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], '
              b'"data": [true, false]}]}', "true/false"),
    "other output": (b'{"model_name": "other", "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], '
                     b'"data": [1, 2]}, {"name": "extra", "datatype": "FP32", "shape": [3], "data": [1]}]}',
                     "output 'extra': shape [3] needs 3 values, got 1"),
}


@pytest.fixture(scope="module")
def bad_upstream(world, adult_model):
    """A V2 upstream whose answers break the tensor rules, one way per upstream model name; a model version
    registered on it for each, unpatched (the answer would pass through untouched if it were not checked)."""
    meta = OnnxModel(adult_model.onnx_bytes, name="any").metadata.model_dump(exclude_none=True)

    async def answer(name: str):
        return Response(BAD_ANSWERS[name][0], media_type="application/json")

    names = {case: f"bad-{case.replace(' ', '-')}-{uuid.uuid4().hex[:6]}" for case in BAD_ANSWERS}
    with ServerThread(scripted_v2_app(meta, answer)) as up:
        specs = [ModelSpec(name=m, version="1", upstream=UpstreamSpec(url=up.url, model_name=case, model_version="1",
                                                                      output_name="logits"))
                 for case, m in names.items()]

        async def register(registry, _store):
            for s in specs:
                await registry.put(s)

        async def unregister(registry, _store):
            for s in specs:
                await registry.delete(s.name, s.version)

        redis_call(world.redis_url, register)
        try:
            yield names
        finally:
            redis_call(world.redis_url, unregister)


@pytest.mark.parametrize("protocol", ["v2", "v1"])
@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_an_upstream_answer_that_breaks_the_tensor_rules_is_a_502_both_ways(world, bad_upstream, case, protocol):
    m = bad_upstream[case]
    if protocol == "v2":
        r = world.client.post(f"/v2/models/{m}/infer", json=body(np.zeros((1, 103), dtype=np.float32)))
    else:
        r = world.client.post(f"/v1/models/{m}:predict", json={"instances": [[0.0] * 103]})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert "sent an invalid output" in error and BAD_ANSWERS[case][1] in error, error
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON: {c}"))
    assert_serving(world)


def test_a_stored_registration_with_an_unusable_url_is_a_502(world):
    m = f"port-{uuid.uuid4().hex[:6]}"
    spec = ModelSpec(name=m, upstream=UpstreamSpec(url="http://127.0.0.1:9", output_name="logits"))
    raw = spec.model_dump_json().replace("127.0.0.1:9", "127.0.0.1:99999")  # stored before URLs were checked

    async def store(registry, _store):
        await registry.redis.set(registry._key(m, "1"), raw)
        await registry.redis.sadd(f"{registry.prefix}models", f"{m}\x001")

    async def drop(registry, _store):
        await registry.delete(m, "1")

    redis_call(world.redis_url, store)
    try:
        r = world.client.post(f"/v2/models/{m}/infer", json=body(np.zeros((1, 103), dtype=np.float32)))
        assert r.status_code == 502 and "unusable" in r.json()["error"] and "99999" in r.json()["error"], r.text
        r = world.client.post(f"/v1/models/{m}:predict", json={"instances": [[0.0] * 103]})
        assert r.status_code == 502 and "unusable" in r.json()["error"], r.text
    finally:
        redis_call(world.redis_url, drop)
    assert_serving(world)


def test_a_registered_or_deleted_version_is_seen_by_this_replica_at_once(world):
    m = f"deleted-{uuid.uuid4().hex[:6]}"
    spec = {"name": m, "version": "1", "upstream": {"url": world.upstream_url, "model_name": UPSTREAM_NAME,
                                                    "model_version": UPSTREAM_VERSION, "output_name": "logits"}}
    X, _, _ = batch(world, 2)
    assert world.client.post(f"/v2/models/{m}/infer", json=body(X)).status_code == 404  # a miss, remembered
    assert world.client.post("/v1/models", json=spec).status_code == 201
    assert world.client.post(f"/v2/models/{m}/infer", json=body(X)).status_code == 200  # registered: seen at once
    assert world.client.delete(f"/v1/models/{m}/versions/1").status_code == 204
    r = world.client.post(f"/v2/models/{m}/infer", json=body(X))
    assert r.status_code == 404, r.text  # not served from the registration cache for a few seconds more


# --- a patch is served only for the model version it was made for -----------------------------------------

def test_an_active_pointer_to_another_versions_patch_is_refused_not_applied(world, caplog):
    m = f"bound-{uuid.uuid4().hex[:6]}"
    up = UpstreamSpec(url=world.upstream_url, model_name=UPSTREAM_NAME, model_version=UPSTREAM_VERSION,
                      output_name="logits")
    patch = world.patches[(world.names.free, "1")].for_model(m, "1")  # made for version 1

    async def setup(registry, store):
        for v in ("1", "2"):
            await registry.put(ModelSpec(name=m, version=v, upstream=up))
        await store.put(patch)
        await store.redis.set(f"{store.prefix}active:{m}:2", patch.id)  # version 2's pointer, behind the API's back

    async def drop(registry, store):
        for v in ("1", "2"):
            await registry.delete(m, v)
        await store.deactivate(m, "2")

    redis_call(world.redis_url, setup)
    try:
        X, _, _ = batch(world, 3)
        for r in (world.client.post(f"/v2/models/{m}/versions/2/infer", json=body(X)),
                  world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist()}),  # the latest: 2
                  world.client.get(f"/v2/models/{m}/versions/2")):
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert f"model {m} version 1, not {m} version 2" in error and "deactivate" in error, error
            assert "fairpatch-patch" not in r.headers
    finally:
        redis_call(world.redis_url, drop)
    assert any("cannot be served" in r.message for r in caplog.records)  # and the operator is told
    assert_serving(world)


def test_stored_patch_bytes_that_fail_their_hash_are_refused_on_a_fresh_replica(world):
    m = f"tampered-{uuid.uuid4().hex[:6]}"
    up = UpstreamSpec(url=world.upstream_url, model_name=UPSTREAM_NAME, model_version=UPSTREAM_VERSION,
                      output_name="logits")
    patch = world.patches[(world.names.free, "1")].for_model(m, "1")
    other = table_patch().for_model(m, "1")

    async def setup(registry, store):
        await registry.put(ModelSpec(name=m, version="1", upstream=up))
        await store.activate(m, "1", await store.put(patch))
        await store.redis.set(f"{store.prefix}patch:{patch.id}", other.to_bytes())  # the bytes change in Redis

    async def drop(registry, store):
        await registry.delete(m, "1")
        await store.deactivate(m, "1")

    redis_call(world.redis_url, setup)
    try:  # this gateway has never loaded the patch: it reads the changed bytes, as a fresh replica would
        X, _, _ = batch(world, 3)
        r = world.client.post(f"/v2/models/{m}/infer", json=body(X))
        assert r.status_code == 409, r.text
        assert f"the active patch {patch.id[:12]} cannot be served" in r.json()["error"]
        assert "not the expected" in r.json()["error"]
        r = world.client.get(f"/v1/patches/{patch.id}")
        assert r.status_code == 409 and "fails verification" in r.json()["error"], r.text
    finally:
        redis_call(world.redis_url, drop)
    assert_serving(world)
