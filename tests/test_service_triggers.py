"""A fairness-trigger job through the running gateway: real uvicorn servers on loopback (gateway and the
local ONNX upstream serving the cached Adult reference model), a real Redis (REDIS_URL, else embedded)
and an arq worker in a thread. The job learns the trigger from scores alone (zeroth order, through the
worker's HttpOracle); once activated, the gateway's answers must equal the patch applied offline from its own
graphs (tests.expected): the trigger, then the model, then the patch's output transform. The upstream counts the
rows it receives: the job's budget as the upstream saw it."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from patcher.patch import Patch
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import redis_url_for
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread
from tests.expected import patched_scores, seen_rows
from tests.test_service_jobs import CountingUpstream

KEY = "trigger-admin-key"
RUN = uuid.uuid4().hex[:6]
BUDGET = 6000


@pytest.fixture(scope="module")
def gateway(adult, adult_model, tmp_path_factory):
    with redis_url_for(os.environ.get("REDIS_URL") or None, tmp_path_factory.mktemp("redis")) as redis_url:
        settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                            job_queue=f"test-trigger-jobs:{RUN}")
        counting = CountingUpstream(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult")))
        with ServerThread(counting) as upstream, ServerThread(create_app(settings)) as server, \
                WorkerThread(settings, redis_url), \
                httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            name = f"adult-trigger-{RUN}"
            spec = {"name": name, "version": "1", "groups": ["Female", "Male"],
                    "upstream": {"url": upstream.url, "model_name": "adult", "input_name": "input",
                                 "output_name": "logits", "output_kind": "logits", "timeout_s": 10}}
            assert c.post("/v1/models", json=spec).status_code == 201
            frame = pd.DataFrame(adult.tune.X, columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
            frame["income"] = adult.tune.y
            frame["sex"] = [adult.group_names[g] for g in adult.tune.groups]
            r = c.post("/v1/datasets", params={"label": "income", "group": "sex"},
                       content=frame.to_csv(index=False).encode(), headers={"content-type": "text/csv"})
            assert r.status_code == 201, r.text
            yield c, name, r.json()["id"], counting


def wait(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        assert time.monotonic() < deadline, f"job still {record['status']}: {record['progress']}"
        time.sleep(0.2)


def infer(client: httpx.Client, model: str, X: np.ndarray) -> tuple[np.ndarray, httpx.Response]:
    body = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    r = client.post(f"/v2/models/{model}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = [o for o in r.json()["outputs"] if o["name"] == "logits"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"]), r


def test_a_zeroth_order_trigger_job_serves_exactly_the_offline_patch(gateway, adult, adult_model):
    client, model, dataset, counting = gateway
    body = {"model": model, "method": "trigger", "access": "zeroth_order", "dataset": dataset, "criterion": "dp",
            "query_budget": BUDGET, "holdout": 0.3, "seed": 0,
            "options": {"zo_columns": 4, "eval_size": 500, "evals": 1, "lam": 10.0, "zo_lr": 0.1}}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    done = wait(client, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["access"] == "zeroth_order" and 0 < result["queries_used"] <= BUDGET
    # every row the upstream received was a fit query or an evaluation query (before, and after the trigger)
    assert counting.rows == result["queries_used"] + result["eval_queries"], (counting.rows, result)
    assert result["holdout_rows"] < result["eval_queries"] <= 2 * result["holdout_rows"]  # repeated rows asked once
    assert result["report"]["access"] == "zeroth_order" and result["report"]["steps"] > 0
    assert result["after"]["dp_diff"] < result["before"]["dp_diff"], result  # the held-out rows, via the upstream

    X = adult.test.X[:200].astype(np.float32)
    unpatched, _ = infer(client, model, X)
    pid = result["patch_id"]
    assert client.post(f"/v1/models/{model}/versions/1/patches/{pid}/activate").status_code == 200
    patch = Patch.from_bytes(client.get(f"/v1/patches/{pid}").content, expected_id=pid)
    assert patch.method == "trigger" and patch.part("input_transform") is not None and not patch.group_at_inference

    served, response = infer(client, model, X)
    assert response.headers["fairpatch-patch"] == pid

    seen = seen_rows(patch, X)  # offline: the trigger, the model itself, the patch's output transform
    assert seen.shape == X.shape and not np.allclose(seen, X)
    raw = ort.InferenceSession(adult_model.onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": seen})[0]
    np.testing.assert_allclose(served, patched_scores(patch, seen, raw), atol=1e-4)
    assert not np.allclose(served, unpatched, atol=1e-3)  # the trigger changed what the model answers
    assert (served.argmax(1) != unpatched.argmax(1)).any() or patch.part("output_transform") is None
