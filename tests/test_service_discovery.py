"""Issue 14's eight points, against upstreams that behave like real model servers: a scikit-learn-like OIP
server (MLServer's defaults: metadata that declares no tensors, `predict` hard labels unless an output is asked
for by name, no binary tensor extension) and the gateway's own ONNX upstream, all real servers on loopback,
with a real Redis and an arq worker in a thread."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from patcher.scores import softmax
from service.app import create_app
from service.discovery import output_kind_of
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import redis_url_for
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread, eval_sample

KEY = "discovery-admin-key"
RUN = uuid.uuid4().hex[:6]


class SklearnLike:
    """An OIP server shaped like MLServer 1.7 serving a scikit-learn classifier with default settings: the
    Adult reference model's logits behind `predict_proba` (FP64 probabilities) and `predict` (INT64 labels)."""

    def __init__(self, onnx: bytes, *, declared: bool = False) -> None:
        self.model = OnnxModel(onnx, name="adult")
        self.declared = declared  # metadata as when model-settings.json lists the tensors
        self.down = threading.Event()
        self.rows = 0
        self.asked: list[list[str] | None] = []  # the outputs each infer request named (None: none)
        self.app = self._app()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v2")
        async def server() -> dict:
            return {"name": "mlserver", "version": "1.7.1", "extensions": []}

        @app.get("/v2/health/ready")
        async def ready() -> JSONResponse:
            return JSONResponse({}, status_code=503 if self.down.is_set() else 200)

        @app.get("/v2/models/{name}")
        async def metadata(name: str) -> dict:
            if not self.declared:
                return {"name": name, "versions": [], "platform": "", "inputs": [], "outputs": []}
            width = self.model.metadata.inputs[0].shape[1]
            return {"name": name, "versions": [], "platform": "",
                    "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, width]}],
                    "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]},
                                {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]}]}

        @app.get("/v2/models/{name}/ready")
        async def model_ready(name: str) -> JSONResponse:
            return JSONResponse({}, status_code=503 if self.down.is_set() else 200)

        @app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request):
            if request.headers.get("inference-header-content-length"):  # no binary extension: it breaks
                return PlainTextResponse("Traceback (most recent call last): ... JSONDecodeError", status_code=500)
            body = json.loads(await request.body())
            tensor = body["inputs"][0]
            X = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
            self.rows += len(X)
            asked = [o["name"] for o in body.get("outputs") or []] or None
            self.asked.append(asked)
            logits = self.model.run({"input": X}, ["logits"])[0]
            answers = {"predict_proba": ("FP64", list(logits.shape), softmax(logits).ravel().tolist()),
                       "predict": ("INT64", [len(X)], logits.argmax(1).tolist())}
            unknown = [n for n in asked or [] if n not in answers]
            if unknown:
                return JSONResponse({"error": f"unknown output {unknown[0]}"}, status_code=400)
            outputs = [{"name": n, "datatype": answers[n][0], "shape": answers[n][1], "data": answers[n][2]}
                       for n in asked or ["predict"]]
            return {"model_name": name, "outputs": outputs}

        return app


@pytest.fixture(scope="module")
def sklearn_like(adult_model):
    up = SklearnLike(adult_model.onnx_bytes)
    with ServerThread(up.app) as server:
        up.url = server.url
        yield up


@pytest.fixture(scope="module")
def sklearn_declared(adult_model):
    up = SklearnLike(adult_model.onnx_bytes, declared=True)
    with ServerThread(up.app) as server:
        up.url = server.url
        yield up


@pytest.fixture(scope="module")
def onnx_upstream(adult_model):
    with ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult"))) as server:
        yield server.url


@pytest.fixture(scope="module")
def settings(redis_url, tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                    job_queue=f"test-discovery:{RUN}")


@pytest.fixture(scope="module")
def worker(settings):
    with WorkerThread(settings, settings.redis_url) as w:
        yield w


@pytest.fixture(scope="module")
def client(settings, worker):
    with ServerThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client, adult) -> str:
    frame = pd.DataFrame(adult.tune.X[:3000], columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
    frame["income"] = adult.tune.y[:3000]
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[:3000]]
    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=frame.to_csv(index=False),
                    headers={"content-type": "text/csv"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def register(client, name: str, url: str, **upstream) -> httpx.Response:
    spec = {"name": f"{name}-{RUN}", "groups": ["Female", "Male"],
            "upstream": {"url": url, "model_name": "adult", **upstream}}
    return client.post("/v1/models", json=spec)


def run_job(client, model: str, dataset: str, **extra) -> dict:
    body = {"model": f"{model}-{RUN}", "method": "eraser", "dataset": dataset, "query_budget": 600,
            "options": {"bias": "group"}, **extra}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 180
    while (record := client.get(f"/v1/jobs/{r.json()['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    return record


def error(r: httpx.Response) -> str:
    return r.json()["error"]


SKLEARN = {"input_name": "input-0", "output_name": "predict_proba", "output_kind": "probabilities"}


# 1. metadata that declares no tensors -----------------------------------------------------------------

def test_empty_metadata_without_names_is_refused_at_registration_with_what_to_register(client, sklearn_like):
    r = register(client, "bare", sklearn_like.url)
    assert r.status_code == 400
    assert "declares no inputs" in error(r) and "upstream.input_name" in error(r)


def test_empty_metadata_with_registered_names_serves_inference(client, sklearn_like, adult_model, adult):
    r = register(client, "named", sklearn_like.url, **SKLEARN)
    assert r.status_code == 201, r.text
    found = r.json()["discovery"]
    assert found["checked"] and found["declared_inputs"] == [] and "registered names are used" in found["notes"][0]
    X = adult.test.X[:4]
    body = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    r = client.post(f"/v2/models/named-{RUN}/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    expected = softmax(OnnxModel(adult_model.onnx_bytes, name="a").run({"input": X}, ["logits"])[0])
    assert out["name"] == "predict_proba" and np.allclose(np.reshape(out["data"], (4, 2)), expected, atol=1e-6)
    meta = client.get(f"/v2/models/named-{RUN}").json()
    assert [t["name"] for t in meta["inputs"]] == ["input-0"] and [t["name"] for t in meta["outputs"]] == [
        "predict_proba"]


# 2. the registered output is asked for by name ---------------------------------------------------------

def test_jobs_and_inference_ask_the_upstream_for_the_registered_output(client, sklearn_like, dataset):
    assert register(client, "asks", sklearn_like.url, **SKLEARN).status_code == 201
    sklearn_like.asked.clear()
    done = run_job(client, "asks", dataset, eval_budget=300)
    assert done["status"] == "succeeded", done["error"]
    assert sklearn_like.asked and all(a == ["predict_proba"] for a in sklearn_like.asked), sklearn_like.asked
    after, before = done["result"]["after"], done["result"]["before"]
    assert after["dp_diff"] < before["dp_diff"]


def test_a_hard_label_output_fails_the_job_and_the_check_with_the_output_to_register(client, sklearn_like, dataset):
    r = register(client, "labels", sklearn_like.url, input_name="input-0", output_name="predict")
    assert r.status_code == 201, r.text  # no feature width declared: nothing to probe with at registration
    done = run_job(client, "labels", dataset)
    assert done["status"] == "failed" and "hard labels" in done["error"] and "predict_proba" in done["error"]
    r = client.post(f"/v1/models/labels-{RUN}/versions/1/check", json={"dataset": dataset})
    assert r.status_code == 400 and "hard labels" in error(r) and "predict_proba" in error(r)


# 3. the output kind is checked --------------------------------------------------------------------------

def test_probabilities_registered_as_logits_are_refused_with_the_fix(client, sklearn_like, dataset):
    r = register(client, "kind", sklearn_like.url, input_name="input-0", output_name="predict_proba")  # logits
    assert r.status_code == 201, r.text
    done = run_job(client, "kind", dataset)
    assert done["status"] == "failed" and "output_kind probabilities" in done["error"], done["error"]
    r = client.post(f"/v1/models/kind-{RUN}/versions/1/check", json={"dataset": dataset})
    assert r.status_code == 400 and "output_kind probabilities" in error(r)
    assert register(client, "kind-ok", sklearn_like.url, **SKLEARN).status_code == 201
    r = client.post(f"/v1/models/kind-ok-{RUN}/versions/1/check", json={"dataset": dataset, "rows": 4})
    assert r.status_code == 200 and r.json()["output_kind_seen"] == "probabilities", r.text


def test_models_check_probes_a_declared_width_and_registration_sends_no_inference(client, onnx_upstream):
    r = register(client, "probed", onnx_upstream, output_kind="probabilities")  # it answers logits
    assert r.status_code == 201 and r.json()["discovery"]["output_kind_seen"] is None, r.text
    r = client.post(f"/v1/models/probed-{RUN}/versions/1/check")  # one row of zeros: the width is declared
    assert r.status_code == 400 and "register upstream.output_kind logits" in error(r)
    r = register(client, "probed-ok", onnx_upstream)
    r = client.post(f"/v1/models/probed-ok-{RUN}/versions/1/check")
    assert r.status_code == 200 and r.json()["output_kind_seen"] == "logits", r.text


def test_an_output_declared_as_integers_is_refused_at_registration(client, sklearn_declared):
    r = register(client, "declared", sklearn_declared.url, output_name="predict")
    assert r.status_code == 400 and "hard labels" in error(r) and "as INT64" in error(r)
    r = register(client, "declared", sklearn_declared.url, output_name="predict_proba", output_kind="probabilities")
    assert r.status_code == 201, r.text
    assert r.json()["discovery"]["declared_outputs"] == ["predict", "predict_proba"]
    r = register(client, "declared-typo", sklearn_declared.url, output_name="predict_probs")
    assert r.status_code == 400 and "does not declare" in error(r) and "predict_proba" in error(r)


@pytest.mark.parametrize(("scores", "kind"), [
    ([[0.2, 0.8], [0.5, 0.5]], "probabilities"), ([[1.3, -0.4], [0.1, 2.0]], "logits"), ([0, 1, 1], "labels"),
    ([[0.0, 1.0], [1.0, 0.0]], "labels"), ([[0.3], [0.9]], "probabilities"), ([[0.3, 0.3]], "logits")])
def test_output_kind_of(scores, kind):
    assert output_kind_of(np.asarray(scores)) == kind


# 4. binary data only where the server has the extension --------------------------------------------------

def test_binary_data_follows_the_servers_extensions(client, sklearn_like, onnx_upstream):
    r = register(client, "binary", sklearn_like.url, binary_data=True, **SKLEARN)
    assert r.status_code == 400 and "does not advertise the binary tensor extension" in error(r)
    r = register(client, "auto-json", sklearn_like.url, **SKLEARN)
    assert r.status_code == 201 and r.json()["upstream"]["binary_data"] is False
    r = register(client, "auto-binary", onnx_upstream)
    assert r.status_code == 201 and r.json()["upstream"]["binary_data"] is True
    assert register(client, "auto-binary", onnx_upstream).status_code == 200  # the same registration again


def test_an_unreachable_upstream_is_registered_unchecked_with_a_note(client):
    r = register(client, "unchecked", "http://127.0.0.1:9", **SKLEARN)
    assert r.status_code == 201, r.text
    found = r.json()["discovery"]
    assert not found["checked"] and "not checked" in found["notes"][0] and r.json()["upstream"]["binary_data"] == "auto"


# 6. budgets that bound upstream traffic ---------------------------------------------------------------------

def test_a_job_sends_at_most_its_query_and_eval_budgets(client, sklearn_like, dataset):
    assert register(client, "budget", sklearn_like.url, **SKLEARN).status_code == 201
    sent = sklearn_like.rows
    done = run_job(client, "budget", dataset, query_budget=600, eval_budget=400)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    # a stratified sample: each cell's share rounded, so a row or two under the budget, never over it
    assert 395 <= result["holdout_rows"] <= 400 and result["eval_budget"] == 400 and result["eval_queries"] <= 400
    assert sklearn_like.rows - sent == result["queries_used"] + result["eval_queries"] <= 1000


def test_holdout_zero_fits_on_every_row_and_says_there_is_no_report(client, sklearn_like, dataset):
    assert register(client, "nohold", sklearn_like.url, **SKLEARN).status_code == 201
    done = run_job(client, "nohold", dataset, holdout=0)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["fit_rows"] == 3000 and result["holdout_rows"] == 0 and result["eval_queries"] == 0
    assert result["before"] is None and "no held-out report" in result["note"]


def test_the_eval_sample_keeps_every_cell_and_its_bound():
    rng = np.random.default_rng(0)
    y, groups = rng.integers(0, 2, 5000), rng.integers(0, 2, 5000)
    pick = eval_sample(y, groups, 700, seed=0)
    assert 695 <= len(pick) <= 700 and len(set(pick.tolist())) == len(pick)
    assert {(int(a), int(b)) for a, b in zip(y[pick], groups[pick], strict=True)} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert len(eval_sample(y[:50], groups[:50], 700, seed=0)) == 50 and len(eval_sample(y, groups, 0, 0)) == 0


# 7. readiness reflects the upstream ------------------------------------------------------------------------

def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def own_gateway(settings: Settings, tmp_path, up: SklearnLike, **overrides):
    """A gateway on a Redis of its own (so only this test's model is registered there), its upstream `up`."""
    with redis_url_for(None, tmp_path) as url, ServerThread(up.app) as upstream, \
            ServerThread(create_app(settings.model_copy(update={"redis_url": url, **overrides}))) as gw, \
            httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        assert register(c, "ready", upstream.url, **SKLEARN).status_code == 201
        yield c, upstream.url


def test_readiness_follows_the_upstream_going_down_and_coming_back(settings, adult_model, tmp_path):
    up = SklearnLike(adult_model.onnx_bytes)
    with own_gateway(settings, tmp_path, up) as (c, url):
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get(f"/v2/models/ready-{RUN}/ready").json() == {"name": f"ready-{RUN}", "ready": True}
        up.down.set()
        wait_for(lambda: c.get("/v2/health/ready").status_code == 503, "the gateway to be unready")
        r = c.get(f"/v2/models/ready-{RUN}/ready")
        assert r.status_code == 503 and "503" in r.json()["error"] and url in r.json()["error"]
        assert c.get("/v2/health/live").json() == {"live": True}  # liveness stays local
        up.down.clear()
        wait_for(lambda: c.get("/v2/health/ready").status_code == 200, "the gateway to be ready again")
        wait_for(lambda: c.get(f"/v2/models/ready-{RUN}/ready").status_code == 200, "the model to be ready again")


def test_readiness_checks_of_upstreams_can_be_turned_off(settings, adult_model, tmp_path):
    up = SklearnLike(adult_model.onnx_bytes)
    with own_gateway(settings, tmp_path, up, ready_checks_upstreams=False) as (c, _url):
        up.down.set()
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get(f"/v2/models/ready-{RUN}/ready").json()["ready"] is True


# 8. the worker counts failed jobs -------------------------------------------------------------------------

def test_the_worker_counts_a_failed_job_as_failed(client, worker, sklearn_like, dataset):
    assert register(client, "fails", sklearn_like.url, input_name="input-0", output_name="predict").status_code \
        in (200, 201)
    failed = worker.worker.jobs_failed
    done = run_job(client, "fails", dataset)
    assert done["status"] == "failed"
    wait_for(lambda: worker.worker.jobs_failed == failed + 1, "the worker to count the failed job")


def test_the_cli_checks_a_model_against_a_datasets_rows(client, sklearn_like, dataset):
    import os
    import subprocess
    import sys
    from pathlib import Path

    assert register(client, "cli", sklearn_like.url, **SKLEARN).status_code == 201
    env = {**os.environ, "FAIRPATCH_URL": str(client.base_url).rstrip("/"), "FAIRPATCH_ADMIN_KEY": KEY}
    p = subprocess.run([sys.executable, "-m", "clients", "models", "check", f"cli-{RUN}", "--dataset", dataset],
                       capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    assert "output kind seen: probabilities" in p.stdout and "registered names are used" in p.stdout, p.stdout


@pytest.mark.parametrize(("protocol", "kind", "scores", "words"), [
    ("mlflow", "probabilities", [0, 1, 1], "pyfunc_predict_fn='predict_proba'"),
    ("v1", "probabilities", [[1], [0]], "predict returns predict_proba"),
    ("v2", "probabilities", [[2.5, -1.0]], "register upstream.output_kind logits"),
    ("v2", "logits", [[0.25, 0.75]], "register upstream.output_kind probabilities")])
def test_scores_that_cannot_fit_the_registration_are_refused_with_the_fix(protocol, kind, scores, words):
    from service.discovery import check_scores
    from service.registry import ModelSpec, UpstreamSpec
    from service.upstream import UpstreamError

    spec = ModelSpec(name="m", upstream=UpstreamSpec(url="http://127.0.0.1:1", protocol=protocol, output_kind=kind))
    with pytest.raises(UpstreamError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_scores(spec, np.asarray(scores, dtype=np.float64))
    assert check_scores(spec.model_copy(update={"upstream": spec.upstream.model_copy(
        update={"output_kind": "logits"})}), np.asarray([[0.3], [0.9]])) == "probabilities"  # one column: a logit too


def test_a_wrong_upstream_model_name_is_refused_and_a_server_without_get_v2_is_taken_as_plain_json(client,
                                                                                                 sklearn_like):
    r = client.post("/v1/models", json={"name": f"noname-{RUN}", "upstream": {"url": sklearn_like.url,
                                                                             "model_name": "adult/x", **SKLEARN}})
    assert r.status_code == 400 and "has no model 'adult/x'" in error(r) and "upstream.model_name" in error(r)
    app = FastAPI()  # metadata, no GET /v2 (404)

    @app.get("/v2/models/{name}")
    async def metadata(name: str) -> dict:
        return {"name": name, "platform": "", "inputs": [], "outputs": []}

    with ServerThread(app) as server:
        r = register(client, "nov2", server.url, **SKLEARN)
        assert r.status_code == 201 and r.json()["upstream"]["binary_data"] is False, r.text
        assert r.json()["discovery"]["extensions"] == []
