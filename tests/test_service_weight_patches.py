"""Weight patches through the running gateway: while a patch with a replacement model is active the gateway
serves that model itself with onnxruntime (the upstream gets no call), says so in a header and in the V2
metadata, and deactivating sends requests back to the upstream. Also: randomized output transforms draw
from the V2 request id, so a replayed request gets the same decisions. Real servers on loopback (gateway and
local ONNX upstream, uvicorn in threads), a real Redis (REDIS_URL, else embedded), real ONNX models."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from types import SimpleNamespace

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from patcher.apply import uniform_draws
from patcher.onnx_graphs import GraphBuilder, float_tensor, int_tensor, mlp_model
from patcher.patch import Patch
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import redis_url_for
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread
from tests import expected as expected_scores
from tests.expected import log_softmax
from tests.test_service_jobs import CountingUpstream

KEY = "weights-admin-key"
RUN = uuid.uuid4().hex[:6]
D = 5
GROUPS = ["a", "b"]


def mlp(seed: int, d: int = D) -> bytes:
    rng = np.random.default_rng(seed)
    return mlp_model([(rng.normal(size=(d, 8)), rng.normal(size=8)), (rng.normal(size=(8, 2)), rng.normal(size=2))])


def run_onnx(model: bytes, X: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def random_nudge(scale: float = 3.0) -> bytes:
    """An output transform with a randomized part: log_probs + [0, scale * uniform] per row."""
    b = GraphBuilder()
    u = b.op("Unsqueeze", ["uniform", b.const(np.array([1], dtype=np.int64))])
    nudge = b.op("Mul", [u, b.const(np.array([0.0, scale], dtype=np.float32))])
    b.op("Add", ["log_probs", nudge], "patched")
    inputs = [float_tensor("log_probs", ["N", 2]), float_tensor("uniform", ["N"])]
    return b.model(inputs, [float_tensor("patched", ["N", 2])], "nudge").SerializeToString()


def group_shift() -> bytes:
    """An output transform that needs the group: log_probs + table[group]."""
    b = GraphBuilder()
    row = b.op("Gather", [b.const(np.array([[0.0, 2.0], [0.0, -2.0]], dtype=np.float32)), "group"], axis=0)
    b.op("Add", ["log_probs", row], "patched")
    inputs = [float_tensor("log_probs", ["N", 2]), int_tensor("group", ["N"])]
    return b.model(inputs, [float_tensor("patched", ["N", 2])], "shift").SerializeToString()


class Counting(CountingUpstream):
    """The upstream app, counting the requests it gets (`calls`) and the rows of its infer requests (`rows`, read
    from the requests as sent: the upstream's own count, not the oracle's)."""

    def __init__(self, app) -> None:
        super().__init__(app)
        self.calls = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.calls += 1
        await super().__call__(scope, receive, send)


@pytest.fixture(scope="module")
def world(tmp_path_factory, adult_model):
    tmp = tmp_path_factory.mktemp("weights")
    upstream_model, replacement = mlp(0), mlp(1)
    counting = Counting(create_upstream_app(OnnxModel(upstream_model, name="m")))
    adult_counting = Counting(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with redis_url_for(os.environ.get("REDIS_URL") or None, tmp / "redis") as redis_url, \
            ServerThread(counting) as up, ServerThread(adult_counting) as adult_up:
        settings = Settings(data_dir=tmp / "gw", redis_url=redis_url, admin_key=KEY, patch_recheck_s=0.2,
                            job_queue=f"test-weights:{RUN}")
        with ServerThread(create_app(settings)) as gw, WorkerThread(settings, redis_url), \
                httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            names = SimpleNamespace(main=f"w-{RUN}", down=f"wdown-{RUN}", nudge=f"wnudge-{RUN}",
                                    adult=f"wadult-{RUN}", bare=f"wbare-{RUN}")
            for name, url, upstream_name, groups in (
                    (names.main, up.url, "m", GROUPS), (names.down, f"http://127.0.0.1:{closed}", "m", GROUPS),
                    (names.nudge, up.url, "m", GROUPS), (names.adult, adult_up.url, "adult", ["Female", "Male"]),
                    (names.bare, adult_up.url, "adult", ["Female", "Male"])):
                spec = {"name": name, "version": "1", "groups": groups, "upstream": {
                    "url": url, "model_name": upstream_name, "input_name": "input", "output_name": "logits"}}
                assert client.post("/v1/models", json=spec).status_code == 201
            yield SimpleNamespace(client=client, upstream=counting, adult_upstream=adult_counting, names=names,
                                  redis_url=redis_url,
                                  upstream_model=upstream_model, replacement=replacement,
                                  adult_model=adult_model.onnx_bytes)


def upload(world, model: str, patch: Patch) -> str:
    r = world.client.post(f"/v1/models/{model}/versions/1/patches", content=patch.to_bytes(),
                          headers={"content-type": "application/zip"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def activate(world, model: str, pid: str) -> None:
    r = world.client.post(f"/v1/models/{model}/versions/1/patches/{pid}/activate")
    assert r.status_code == 200, r.text


def deactivate(world, model: str) -> None:
    assert world.client.post(f"/v1/models/{model}/versions/1/patches/deactivate").status_code == 200


def rows(n: int = 16, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def v2(X: np.ndarray, groups=None, **extra) -> dict:
    inputs = [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]
    if groups is not None:
        inputs.append({"name": "group", "shape": [len(groups)], "datatype": "BYTES", "data": list(groups)})
    return {"inputs": inputs, **extra}


def scores(r: httpx.Response, name: str = "logits") -> np.ndarray:
    assert r.status_code == 200, r.text
    (out,) = [o for o in r.json()["outputs"] if o["name"] == name]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def infer(world, model: str, body: dict) -> httpx.Response:
    return world.client.post(f"/v2/models/{model}/versions/1/infer", json=body)


def test_an_active_weight_patch_serves_its_own_model_and_deactivating_returns_to_the_upstream(world):
    m, X = world.names.main, rows()
    before = infer(world, m, v2(X))
    assert before.headers["fairpatch-served-by"] == "upstream" and before.headers["fairpatch-patch"] == "none"
    np.testing.assert_allclose(scores(before), run_onnx(world.upstream_model, X), rtol=1e-5, atol=1e-5)

    patch = Patch.build(method="weights-test", n_classes=2, replacement_model=world.replacement).for_model(m, "1")
    pid = upload(world, m, patch)
    activate(world, m, pid)
    calls = world.upstream.calls
    r = infer(world, m, v2(X))
    assert r.headers["fairpatch-served-by"] == "patch" and r.headers["fairpatch-patch"] == pid
    expected = log_softmax(run_onnx(world.replacement, X).astype(np.float64))  # the patched ONNX, run offline
    np.testing.assert_allclose(scores(r), expected, rtol=1e-5, atol=1e-5)
    assert (scores(r).argmax(1) == run_onnx(world.replacement, X).argmax(1)).all()
    assert not np.array_equal(scores(r).argmax(1), run_onnx(world.upstream_model, X).argmax(1))  # a real change
    assert r.json()["model_name"] == m and r.json()["model_version"] == "1"

    # raw scores: the replacement model's own logits
    raw = scores(infer(world, m, v2(X, parameters={"fairpatch_raw": True})), "fairpatch_raw")
    np.testing.assert_allclose(raw, run_onnx(world.replacement, X), rtol=1e-5, atol=1e-5)
    # V1 predict and V2 metadata, too, are answered without the upstream
    r = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist()})
    assert r.status_code == 200 and r.headers["fairpatch-served-by"] == "patch"
    np.testing.assert_allclose(np.asarray(r.json()["predictions"]), expected, rtol=1e-5, atol=1e-5)
    meta = world.client.get(f"/v2/models/{m}/versions/1")
    assert meta.status_code == 200 and meta.headers["fairpatch-served-by"] == "patch"
    assert meta.json()["parameters"] == {"fairpatch_patch": pid, "fairpatch_served_by": "patch"}
    assert meta.json()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, D]}]
    assert meta.json()["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    assert world.upstream.calls == calls, "the upstream was called while a weight patch was active"
    listed = world.client.get(f"/v1/models/{m}/versions/1/patches").json()
    assert listed["active"] == pid

    deactivate(world, m)
    r = infer(world, m, v2(X))
    assert r.headers["fairpatch-served-by"] == "upstream" and r.headers["fairpatch-patch"] == "none"
    np.testing.assert_array_equal(scores(r), scores(before))
    assert world.upstream.calls > calls
    assert world.client.get(f"/v2/models/{m}/versions/1").json()["parameters"]["fairpatch_served_by"] == "upstream"


def test_a_weight_patch_serves_while_the_upstream_is_down(world):
    m, X = world.names.down, rows(4)
    r = infer(world, m, v2(X))
    assert r.status_code == 502 and "cannot reach upstream" in r.json()["error"]
    patch = Patch.build(method="weights-test", n_classes=2, replacement_model=world.replacement).for_model(m, "1")
    activate(world, m, upload(world, m, patch))
    r = infer(world, m, v2(X))
    assert r.status_code == 200 and r.headers["fairpatch-served-by"] == "patch"
    np.testing.assert_allclose(scores(r), log_softmax(run_onnx(world.replacement, X).astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
    v1 = world.client.post(f"/v1/models/{m}:predict", json={"instances": X.tolist()})  # the same template
    assert v1.status_code == 200 and v1.headers["fairpatch-served-by"] == "patch", v1.text
    np.testing.assert_allclose(v1.json()["predictions"], scores(r), rtol=1e-6)
    assert scores(infer(world, m, v2(np.zeros((0, D), dtype=np.float32)))).shape == (0, 2)  # an empty batch
    deactivate(world, m)
    assert infer(world, m, v2(X)).status_code == 502


def test_a_weight_patch_with_a_group_output_transform_needs_the_group(world):
    m, X = world.names.main, rows(6)
    groups = ["a", "b", "a", "b", "b", "a"]
    patch = Patch.build(method="weights-test", n_classes=2, groups=GROUPS, group_at_inference=True,
                        replacement_model=world.replacement, output_transform=group_shift()).for_model(m, "1")
    activate(world, m, upload(world, m, patch))
    try:
        logits = run_onnx(world.replacement, X).astype(np.float64)  # closed form: log-probs + table[group]
        expected = log_softmax(logits) + np.array([[0.0, 2.0], [0.0, -2.0]])[[GROUPS.index(g) for g in groups]]
        r = infer(world, m, v2(X, groups))
        assert r.headers["fairpatch-served-by"] == "patch"
        np.testing.assert_allclose(scores(r), expected, rtol=1e-5, atol=1e-5)
        r = infer(world, m, v2(X))
        assert r.status_code == 400 and "needs every row's group" in r.json()["error"]
        r = infer(world, m, v2(X, ["a", "b", "a", "b", "b", "zz"]))
        assert r.status_code == 400 and "unknown group 'zz'" in r.json()["error"]
        meta = world.client.get(f"/v2/models/{m}/versions/1").json()
        assert [t["name"] for t in meta["inputs"]] == ["input", "group"]
    finally:
        deactivate(world, m)


def test_a_weight_patch_answers_in_the_binary_tensor_extension_when_asked(world):
    """Triton's client against the gateway while only the patch can answer (its upstream is down): JSON or binary
    inputs, each with JSON or binary outputs; every answer equals the JSON one, and binary is only what was
    asked for (an output's own flag, or the request's binary_data_output)."""
    import tritonclient.http as triton

    from service import binary_tensors

    m, X = world.names.down, rows(64, seed=9)
    patch = Patch.build(method="weights-test", n_classes=2, replacement_model=world.replacement).for_model(m, "1")
    activate(world, m, upload(world, m, patch))
    client = triton.InferenceServerClient(url=world.client.base_url.netloc.decode())
    try:
        want = scores(infer(world, m, v2(X)))
        for binary_in in (False, True):
            for binary_out in (False, True):
                features = triton.InferInput("input", list(X.shape), "FP32")
                features.set_data_from_numpy(X, binary_data=binary_in)
                outputs = [triton.InferRequestedOutput("logits", binary_data=binary_out)]
                result = client.infer(m, [features], model_version="1", outputs=outputs)
                np.testing.assert_array_equal(result.as_numpy("logits"), want)
                (out,) = result.get_response()["outputs"]
                assert ("data" not in out) == binary_out, out  # binary outputs carry binary_data_size instead
        # the request-wide flag, and a JSON body with no Inference-Header-Content-Length at all
        r = infer(world, m, v2(X, parameters={"binary_data_output": True}))
        assert r.headers["content-type"] == binary_tensors.CONTENT_TYPE and r.headers["fairpatch-served-by"] == "patch"
        doc, blob = binary_tensors.split(r.content, r.headers["inference-header-content-length"])
        binary_tensors.attach(doc["outputs"], blob, "output")
        np.testing.assert_array_equal(np.asarray(doc["outputs"][0]["data"]).reshape(want.shape), want)
    finally:
        client.close()
        deactivate(world, m)


@pytest.mark.parametrize(("body", "message"), [
    (v2(rows(3, 1)[:, :4]), "expects [-1, 5]"),
    (json.dumps(v2(np.full((2, D), np.nan, dtype=np.float32))), "NaN"),
    ({**v2(rows(2)), "outputs": [{"name": "doubled"}]}, "no 'doubled'"),
    ({"inputs": [{"name": "other", "shape": [1, D], "datatype": "FP32", "data": [0.0] * D}]}, "no input 'input'"),
])
def test_bad_input_to_a_weight_patch_is_a_400_and_serving_goes_on(world, body, message):
    m = world.names.down  # its upstream is down: only the patch can answer
    patch = Patch.build(method="weights-test", n_classes=2, replacement_model=world.replacement).for_model(m, "1")
    activate(world, m, upload(world, m, patch))
    try:
        r = infer(world, m, body) if isinstance(body, dict) else \
            world.client.post(f"/v2/models/{m}/versions/1/infer", content=body)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert infer(world, m, v2(rows(2))).status_code == 200
    finally:
        deactivate(world, m)


def test_randomized_decisions_are_reproducible_per_request_id(world):
    m, X = world.names.nudge, rows(64, seed=5)
    for replacement in (None, world.replacement):  # through the upstream, then as a weight patch
        patch = Patch.build(method="random-test", n_classes=2, output_transform=random_nudge(),
                            replacement_model=replacement).for_model(m, "1")
        activate(world, m, upload(world, m, patch))
        served_by = "upstream" if replacement is None else "patch"
        first = infer(world, m, v2(X, id="request-1"))
        assert first.headers["fairpatch-served-by"] == served_by and first.json()["id"] == "request-1"
        again = infer(world, m, v2(X, id="request-1"))
        np.testing.assert_array_equal(scores(first), scores(again))
        other = infer(world, m, v2(X, id="request-2"))
        assert not np.array_equal(scores(first).argmax(1), scores(other).argmax(1))
        logits = run_onnx(replacement or world.upstream_model, X).astype(np.float64)
        # closed form: log-probs + [0, 3 u], u the request id's reproducible draws
        expected = log_softmax(logits) + 3.0 * np.outer(uniform_draws("request-1", len(X)), [0.0, 1.0])
        np.testing.assert_allclose(scores(first), expected, rtol=1e-5, atol=1e-5)
    deactivate(world, m)


# --- jobs with gradient and weight access ------------------------------------------------------------------

@pytest.fixture(scope="module")
def adult_job_data(world, adult, adult_model) -> str:
    """The Adult reference model's ONNX file uploaded as the artifact of `adult`, and 2,000 tune rows."""
    r = world.client.post(f"/v1/models/{world.names.adult}/versions/1/artifact", content=adult_model.onnx_bytes,
                          headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    frame = pd.DataFrame(adult.tune.X[:2000], columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
    frame["income"] = adult.tune.y[:2000]
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[:2000]]
    r = world.client.post("/v1/datasets", params={"label": "income", "group": "sex"},
                          content=frame.to_csv(index=False).encode(), headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait(world, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = world.client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        assert time.monotonic() < deadline, f"job stuck: {record}"
        time.sleep(0.1)


def submit(world, dataset: str, model: str | None = None, **extra) -> httpx.Response:
    body = {"model": model or world.names.adult, "dataset": dataset, "criterion": "dp", "query_budget": 5000,
            "holdout": 0.3, "seed": 0, **extra}
    return world.client.post("/v1/jobs", json=body)


def test_gradient_access_needs_an_uploaded_artifact(world, adult_job_data):
    r = submit(world, adult_job_data, world.names.bare, method="trigger", access="gradient")
    assert r.status_code == 409 and "upload it with POST" in r.json()["error"]
    r = submit(world, adult_job_data, method="trigger", access="queries")
    assert r.status_code == 400 and "it supports: zeroth_order, gradient" in r.json()["error"]


def test_a_gradient_trigger_job_fits_on_the_artifact_and_patches_the_gateway(world, adult_job_data, adult):
    calls, rows = world.adult_upstream.calls, world.adult_upstream.rows
    r = submit(world, adult_job_data, method="trigger", access="gradient", options={"steps": 40, "lams": [5.0]})
    assert r.status_code == 202, r.text
    assert r.json()["access"] == "gradient"
    done = wait(world, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["access"] == "gradient" and result["report"]["access"] == "gradient"
    assert result["queries_used"] == 0 and result["served_by"] == "upstream"  # the fit never asked the upstream
    # only the held-out rows went to the upstream (before, and after the trigger): metadata once, then a
    # request per 1,024 rows, twice; a fit through the upstream would have sent its 1,400 rows too
    assert result["holdout_rows"] < result["eval_queries"] <= 2 * result["holdout_rows"]
    assert world.adult_upstream.calls - calls <= 1 + 2 * -(-result["holdout_rows"] // 1024)
    assert world.adult_upstream.rows - rows == result["eval_queries"]  # as the upstream counted them
    assert result["after"]["dp_diff"] < result["before"]["dp_diff"] - 0.05, result

    m, pid = world.names.adult, result["patch_id"]
    activate(world, m, pid)
    try:
        X = adult.test.X[:32].astype(np.float32)
        r = infer(world, m, v2(X, parameters={"fairpatch_raw": True}))
        assert r.headers["fairpatch-patch"] == pid and r.headers["fairpatch-served-by"] == "upstream"
        patch = Patch.from_bytes(world.client.get(f"/v1/patches/{pid}").content, expected_id=pid)
        seen = expected_scores.seen_rows(patch, X)  # the trigger, its ONNX graph run here
        assert not np.allclose(seen, X)
        raw = scores(r, "fairpatch_raw")  # the upstream's scores for the triggered rows
        upstream_logits = run_onnx(world.adult_model, seen)
        np.testing.assert_allclose(raw, upstream_logits, rtol=1e-4, atol=1e-4)
        expected = expected_scores.patched_log_probs(patch, seen, upstream_logits)
        np.testing.assert_allclose(scores(r), expected, rtol=1e-4, atol=1e-4)
    finally:
        deactivate(world, m)


def upload_rows(world, adult, rows: slice, columns: int | None = None) -> str:
    X = adult.tune.X[rows] if columns is None else adult.tune.X[rows][:, :columns]
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    frame["income"] = adult.tune.y[rows]
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[rows]]
    r = world.client.post("/v1/datasets", params={"label": "income", "group": "sex"},
                          content=frame.to_csv(index=False).encode(), headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_forml_job_produces_an_activatable_weight_patch(world, adult_job_data, adult):
    exemplars = upload_rows(world, adult, slice(2000, 2600))
    calls, rows = world.adult_upstream.calls, world.adult_upstream.rows
    r = submit(world, adult_job_data, method="forml", criterion="eopp", exemplar_dataset=exemplars,
               query_budget=None, options={"epochs": 2, "exemplar_batch": 128, "min_per_cell": 8})
    assert r.status_code == 202, r.text
    assert r.json()["access"] == "weights" and r.json()["exemplar_dataset"] == exemplars  # FORML's only kind
    done = wait(world, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["access"] == "weights" and result["served_by"] == "patch" and result["queries_used"] == 0
    assert result["report"]["n_exemplar"] == 600 and result["report"]["n_train"] == result["fit_rows"]
    assert {"tprd", "max_fnr"} <= set(result["report"]["exemplar_metrics"])
    assert result["after"]["accuracy"] > 0.75  # a working classifier, not noise
    assert world.adult_upstream.calls - calls <= 1 + -(-result["holdout_rows"] // 1024)  # only "before" asked it
    assert world.adult_upstream.rows - rows == result["eval_queries"] <= result["holdout_rows"]

    # the sample audit names rows of the uploaded dataset, and exports the dataset without the lowest 10%
    audit, n_train = result["report"]["audit"], result["report"]["n_train"]
    assert sorted(audit["rank_by_weight"]) == sorted(audit["rank_by_ema"]) and len(audit["rank_by_weight"]) == n_train
    assert set(audit["rank_by_weight"]) <= set(range(2000))
    for row in audit["lowest"]:  # the label and group the method saw are those of that row of the file
        assert row["label"] == adult.tune.y[row["row"]]
        assert ["Female", "Male"][row["group"]] == adult.group_names[adult.tune.groups[row["row"]]]
    dropped = sorted(set(audit["rank_by_weight"]) - set(audit["condensed_indices"]))
    assert len(dropped) == round(0.1 * n_train) and result["drop_rows"] == {"condensed": dropped}
    r = world.client.post(f"/v1/jobs/{done['id']}/datasets/condensed")
    assert r.status_code == 201, r.text
    condensed = r.json()
    assert condensed["rows"] == 2000 - len(dropped) and condensed["dropped_rows"] == len(dropped)
    assert condensed["source_dataset"] == adult_job_data and r.headers["location"] == f"/v1/datasets/{condensed['id']}"
    kept = np.setdiff1d(np.arange(2000), dropped)
    names, counts = np.unique(np.asarray(adult.group_names)[adult.tune.groups[:2000][kept]], return_counts=True)
    assert condensed["group_counts"] == dict(zip(names.tolist(), counts.tolist(), strict=True))
    assert world.client.get(f"/v1/datasets/{condensed['id']}").json()["rows"] == 2000 - len(dropped)
    assert world.client.post("/v1/jobs/nope/datasets/condensed").status_code == 404

    m, pid = world.names.adult, result["patch_id"]
    patch = Patch.from_bytes(world.client.get(f"/v1/patches/{pid}").content, expected_id=pid)
    assert patch.method == "forml" and patch.part("replacement_model") is not None
    assert set(patch.arrays()) == {"sample_weights", "ema_weighted_loss"}
    activate(world, m, pid)
    try:
        X = adult.test.X[:48].astype(np.float32)
        calls = world.adult_upstream.calls
        r = infer(world, m, v2(X))
        assert r.headers["fairpatch-served-by"] == "patch" and r.headers["fairpatch-patch"] == pid
        offline = log_softmax(run_onnx(patch.part("replacement_model"), X).astype(np.float64))
        np.testing.assert_allclose(scores(r), offline, rtol=1e-5, atol=1e-5)
        assert world.adult_upstream.calls == calls
    finally:
        deactivate(world, m)
    assert infer(world, m, v2(adult.test.X[:4].astype(np.float32))).headers["fairpatch-served-by"] == "upstream"


def test_a_job_refuses_an_artifact_that_fails_its_hash(world, adult_job_data, adult_model):
    from redis.asyncio import Redis

    m = world.names.bare
    r = world.client.post(f"/v1/models/{m}/versions/1/artifact", content=adult_model.onnx_bytes,
                          headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text

    async def tamper() -> None:
        redis = Redis.from_url(world.redis_url)
        try:
            await redis.set(f"fp:artifact:{m}:1", mlp(2))  # another model, changed behind the gateway's back
        finally:
            await redis.aclose()

    asyncio.run(tamper())
    r = submit(world, adult_job_data, m, method="forml", query_budget=None, options={"epochs": 1})
    assert r.status_code == 202, r.text
    done = wait(world, r.json()["id"])
    assert done["status"] == "failed" and "not the recorded" in done["error"] and done["result"] is None
    assert world.client.delete(f"/v1/models/{m}/versions/1/artifact").status_code == 204


def test_an_exemplar_dataset_that_does_not_fit_fails_the_job_with_the_reason(world, adult_job_data, adult):
    narrow = upload_rows(world, adult, slice(0, 200), columns=7)
    r = submit(world, adult_job_data, method="forml", exemplar_dataset=narrow, options={"epochs": 1})
    assert r.status_code == 202, r.text
    done = wait(world, r.json()["id"])
    assert done["status"] == "failed" and "has 7 feature columns" in done["error"]
    r = submit(world, adult_job_data, method="forml", options={"epochs": 0})  # the method's own options check
    assert r.status_code == 400 and "invalid options for forml: epochs" in r.json()["error"]


def test_a_random_perturbation_job_produces_a_weight_patch_the_gateway_serves(world, adult_job_data, adult):
    r = submit(world, adult_job_data, method="random_perturbation", query_budget=None, options={"trials": 5})
    assert r.status_code == 202, r.text
    assert r.json()["access"] == "weights"
    done = wait(world, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["served_by"] == "patch" and result["queries_used"] == 0 and result["access"] == "weights"
    r = world.client.post(f"/v1/jobs/{done['id']}/datasets/condensed")
    assert r.status_code == 404 and "proposed no row set 'condensed'; its row sets: none" in r.json()["error"]
    m, pid = world.names.adult, result["patch_id"]
    patch = Patch.from_bytes(world.client.get(f"/v1/patches/{pid}").content, expected_id=pid)
    assert patch.part("replacement_model") is not None
    activate(world, m, pid)
    try:
        X = adult.test.X[:40].astype(np.float32)
        calls = world.adult_upstream.calls
        r = infer(world, m, v2(X))
        assert r.headers["fairpatch-served-by"] == "patch" and world.adult_upstream.calls == calls
        seen = expected_scores.seen_rows(patch, X)  # the patch's own graphs, run here
        offline = expected_scores.patched_log_probs(patch, seen, run_onnx(patch.part("replacement_model"), seen))
        np.testing.assert_allclose(scores(r), offline, rtol=1e-5, atol=1e-5)
    finally:
        deactivate(world, m)


def test_a_method_that_rejects_its_options_while_fitting_fails_the_job_and_the_worker_goes_on(world, adult_job_data):
    r = submit(world, adult_job_data, method="trigger", access="gradient", options={"columns": [500], "steps": 5})
    assert r.status_code == 202, r.text  # valid for the options model; the method itself refuses it
    done = wait(world, r.json()["id"])
    assert done["status"] == "failed" and done["error"].startswith("fitting trigger: trigger columns must be in")
    r = submit(world, adult_job_data, method="random_perturbation", query_budget=None, options={"trials": 2})
    assert wait(world, r.json()["id"])["status"] == "succeeded"  # the same worker runs the next job


def test_an_artifact_is_checked_against_the_upstreams_signature(world):
    m = world.names.main  # its upstream takes [N, 5]
    r = world.client.post(f"/v1/models/{world.names.adult}/versions/1/artifact", content=mlp(0),
                          headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and "cannot be the model the upstream serves" in r.json()["error"]
    assert "[-1, 5]" in r.json()["error"] and "[-1, 103]" in r.json()["error"]
    r = world.client.post(f"/v1/models/{m}/versions/1/artifact", content=world.upstream_model,
                          headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201 and r.json()["upstream_checked"] is True
    r = world.client.post(f"/v1/models/{world.names.down}/versions/1/artifact", content=world.upstream_model,
                          headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201 and r.json()["upstream_checked"] is False  # down: recorded as unchecked
    for name in (m, world.names.down):
        assert world.client.delete(f"/v1/models/{name}/versions/1/artifact").status_code == 204
