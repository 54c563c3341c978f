"""The inference endpoint (service.fast_path) answers the same ahead of FastAPI's stack as behind it.

Two real gateways on loopback share one real Redis and one real upstream (the local ONNX server): one
with the fast path (the default: the endpoint is handed the inference POSTs before FastAPI's stack),
one with `fast_path=False`, where FastAPI's router and middleware pass them to the same endpoint. The
same requests, good and bad, must get the same status, the same body bytes and the same headers from
both; and the fast gateway must really have served them ahead of the stack.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import random_mlp
from redis.asyncio import Redis

from patcher.methods import eraser
from patcher.patch import Patch
from service import fast_path, infer
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.patch_store import PatchStore
from service.registry import ModelRegistry, ModelSpec, UpstreamSpec
from service.serve_thread import ServerThread
from service.settings import Settings

BODY_LIMIT = 64 * 1024
HEADERS = ("content-type", "content-length", "fairpatch-patch", "fairpatch-served-by")


def table_patch() -> Patch:
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    graph = eraser.build_output_graph(5, 2, alpha=1.0, threshold=0.25, bias="group", table=table)
    return Patch.build(method="eraser", n_classes=2, groups=["a", "b"], group_at_inference=True,
                       output_transform=graph)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, redis_url):
    m = f"fast-{closed_port()}"  # a name of our own on a possibly shared Redis
    with ServerThread(create_upstream_app(OnnxModel(random_mlp(5), name="mlp"))) as up:
        upstream = UpstreamSpec(url=up.url, model_name="mlp", output_name="logits")
        specs = [ModelSpec(name=m, version="1", upstream=upstream),  # unpatched
                 ModelSpec(name=m, version="2", upstream=upstream, groups=["a", "b"]),  # patched, the latest
                 ModelSpec(name=f"{m}-down", upstream=upstream.model_copy(
                     update={"url": f"http://127.0.0.1:{closed_port()}"}))]
        patch = table_patch().for_model(m, "2")

        async def setup(drop: bool = False) -> None:
            redis = Redis.from_url(redis_url)
            registry, store = ModelRegistry(redis), PatchStore(redis)
            try:
                for s in specs:
                    await (registry.delete(s.name, s.version) if drop else registry.put(s))
                if drop:
                    await store.deactivate(m, "2")
                else:
                    await store.activate(m, "2", await store.put(patch))
            finally:
                await redis.aclose()

        asyncio.run(setup())
        settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, max_body_bytes=BODY_LIMIT)
        fast_app, slow_app = create_app(settings), create_app(settings.model_copy(update={"fast_path": False}))
        assert fast_app.fast_path is not None and slow_app.fast_path is None
        try:
            with ServerThread(fast_app) as fast, ServerThread(slow_app) as slow, \
                    httpx.Client(base_url=fast.url, timeout=10) as fc, \
                    httpx.Client(base_url=slow.url, timeout=10) as sc:
                yield SimpleNamespace(fast=fc, slow=sc, model=m, patch=patch.id)
        finally:
            asyncio.run(setup(drop=True))


@pytest.fixture
def served_fast(monkeypatch):
    """The paths the endpoint served ahead of FastAPI's stack (the router gives the requests it routes their
    path parameters)."""
    count = []
    serve = fast_path.InferenceEndpoint.__call__

    async def counting(self, target, scope, receive, send):
        if "path_params" not in scope:
            count.append(scope["path"])
        await serve(self, target, scope, receive, send)

    monkeypatch.setattr(fast_path.InferenceEndpoint, "__call__", counting)
    return count


# --- requests -------------------------------------------------------------------------------------------

X = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
GROUPS = ["a", "b", "b", "a"]


def v2(*, x=X, groups=GROUPS, datatype="FP32", shape=None, **extra) -> dict:
    inputs = [{"name": "input", "shape": list(x.shape) if shape is None else shape, "datatype": datatype,
               "data": x.ravel().tolist()}]
    if groups is not None:
        inputs.append({"name": "group", "shape": [len(groups)], "datatype": "BYTES", "data": groups})
    return {"inputs": inputs, **extra}


def binary_body() -> tuple[bytes, dict]:
    """The V2 binary tensor extension: features and groups as raw bytes after the JSON header."""
    groups = b"".join(struct.pack("<I", len(g)) + g.encode() for g in GROUPS)
    inputs = [{"name": "input", "shape": [4, 5], "datatype": "FP32", "parameters": {"binary_data_size": X.nbytes}},
              {"name": "group", "shape": [4], "datatype": "BYTES", "parameters": {"binary_data_size": len(groups)}}]
    header = json.dumps({"inputs": inputs}).encode()
    return header + X.tobytes() + groups, {"inference-header-content-length": str(len(header))}


GOOD = {
    "patched, latest": ("/v2/models/{m}/infer", v2()),
    "patched, by version": ("/v2/models/{m}/versions/2/infer", v2(id="req-1")),
    "raw scores too": ("/v2/models/{m}/infer", v2(parameters={"fairpatch_raw": True})),
    "requested outputs": ("/v2/models/{m}/infer", v2(outputs=[{"name": "logits"}])),
    "unpatched, bytes forwarded": ("/v2/models/{m}/versions/1/infer", v2(groups=None)),
    "shape pydantic coerces": ("/v2/models/{m}/infer", v2(shape=[4.0, "5"])),
    "binary tensors": ("/v2/models/{m}/infer", binary_body()),
    "v1 predict": ("/v1/models/{m}:predict", {"instances": X.tolist(), "groups": GROUPS}),
    "v1 predict, group ids": ("/v1/models/{m}:predict", {"instances": X.tolist(), "groups": [0, 1, 1, 0]}),
}
BAD = {
    "malformed JSON": ("/v2/models/{m}/infer", b'{"inputs": [', 400),
    "empty body": ("/v2/models/{m}/infer", b"", 400),
    "NaN": ("/v2/models/{m}/infer", json.dumps(v2(x=np.full((4, 5), np.nan))).encode(), 400),
    "wrong datatype": ("/v2/models/{m}/infer", v2(datatype="FP64"), 400),
    "unknown datatype": ("/v2/models/{m}/infer", v2(datatype="FLOAT"), 400),
    "wrong width": ("/v2/models/{m}/infer", v2(x=X[:, :4]), 400),
    "count mismatch": ("/v2/models/{m}/infer", v2(shape=[5, 5]), 400),
    "id not a string": ("/v2/models/{m}/infer", v2(id=7), 400),
    "unknown output": ("/v2/models/{m}/infer", v2(outputs=[{"name": "probs"}]), 400),
    "unknown group": ("/v2/models/{m}/infer", v2(groups=["a", "c", "a", "a"]), 400),
    "missing group": ("/v2/models/{m}/infer", v2(groups=None), 400),
    "binary that does not add up": ("/v2/models/{m}/infer", (binary_body()[0][:-3], binary_body()[1]), 400),
    "unknown model": ("/v2/models/{m}-nope/infer", v2(), 404),
    "unknown version": ("/v2/models/{m}/versions/9/infer", v2(), 404),
    "upstream down": ("/v2/models/{m}-down/infer", v2(groups=None), 502),
    "declared body over the limit": ("/v2/models/{m}/infer", b" " * (BODY_LIMIT + 1), 413),
    "v1 malformed": ("/v1/models/{m}:predict", b"{", 400),
    "v1 ragged": ("/v1/models/{m}:predict", {"instances": [[1.0] * 5, [1.0]], "groups": ["a", "b"]}, 400),
    "v1 unknown group": ("/v1/models/{m}:predict", {"instances": X.tolist(), "groups": ["x"] * 4}, 400),
    "v1 unknown model": ("/v1/models/{m}-nope:predict", {"instances": X.tolist()}, 404),
}


def post(client: httpx.Client, path: str, payload) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if isinstance(payload, tuple):
        payload, extra = payload
        headers.update(extra)
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post(path, content=content, headers=headers)


def assert_same(fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.content == slow.content
    assert {h: fast.headers.get(h) for h in HEADERS} == {h: slow.headers.get(h) for h in HEADERS}


@pytest.mark.parametrize("case", list(GOOD))
def test_answers_are_the_same_on_both_paths(gateways, served_fast, case):
    path, payload = GOOD[case]
    path = path.format(m=gateways.model)
    fast, slow = post(gateways.fast, path, payload), post(gateways.slow, path, payload)
    assert fast.status_code == 200, fast.text
    assert_same(fast, slow)
    assert served_fast == [path]  # the fast gateway's answer came from the fast path; the other's did not
    patched = "/versions/1/" not in path
    assert fast.headers["fairpatch-patch"] == (gateways.patch if patched else "none")
    assert fast.headers["fairpatch-served-by"] == "upstream"


@pytest.mark.parametrize("case", list(BAD))
def test_errors_are_the_same_on_both_paths(gateways, served_fast, case):
    path, payload, status = BAD[case]
    path = path.format(m=gateways.model)
    fast, slow = post(gateways.fast, path, payload), post(gateways.slow, path, payload)
    assert fast.status_code == status, fast.text
    assert fast.headers["content-type"] == "application/json" and fast.json()["error"]
    assert_same(fast, slow)
    assert served_fast == [path]


def test_a_streamed_body_over_the_limit_is_a_413(gateways, served_fast):
    def chunks():  # no Content-Length: the limit is enforced as the body arrives
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b" " * 4096

    path = f"/v2/models/{gateways.model}/infer"
    fast, slow = gateways.fast.post(path, content=chunks()), gateways.slow.post(path, content=chunks())
    assert fast.status_code == 413 and f"{BODY_LIMIT}-byte limit" in fast.json()["error"]
    assert_same(fast, slow)
    assert served_fast == [path]


def test_a_bug_is_a_500_json_error_on_both_paths(gateways, served_fast, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(infer, "apply_patch", broken)
    path = f"/v2/models/{gateways.model}/infer"
    fast, slow = post(gateways.fast, path, v2()), post(gateways.slow, path, v2())
    assert fast.status_code == 500 and "RuntimeError" in fast.json()["error"]
    # the server closes the connection after a bug; the answer says so, and the client opens a new one
    assert fast.headers["connection"] == slow.headers["connection"] == "close"
    assert_same(fast, slow)
    monkeypatch.undo()
    assert post(gateways.fast, path, v2()).status_code == 200  # and the gateway keeps serving


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/{m}/infer", 405), ("PUT", "/v1/models/{m}:predict", 405),
    ("POST", "/v2/models/{m}/infer/", 404), ("POST", "/v2/models/{m}/versions/2/infer/more", 404),
])
def test_everything_else_goes_to_fastapi(gateways, served_fast, method, path, status):
    path = path.format(m=gateways.model)
    fast = gateways.fast.request(method, path, follow_redirects=False)
    slow = gateways.slow.request(method, path, follow_redirects=False)
    assert fast.status_code in (status, 307) and fast.status_code == slow.status_code
    assert fast.content == slow.content
    assert served_fast == []


def test_the_infer_routes_are_still_documented(gateways):
    paths = gateways.fast.get("/openapi.json").json()["paths"]
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer",
                 "/v1/models/{model_name}:predict"):
        assert "post" in paths[path], path
