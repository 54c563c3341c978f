"""The control plane over a real gateway (uvicorn in a thread) and a real Redis (REDIS_URL, else embedded):
auth, the upstream allow-list, models, datasets (every malformed upload), job validation, patches.
Jobs that run end to end are in test_service_jobs.py."""

from __future__ import annotations

import hashlib
import io
import socket
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest

from patcher.methods.eraser import build_output_graph
from patcher.patch import Patch
from service.app import create_app
from service.auth import upstream_allowed
from service.serve_thread import ServerThread
from service.settings import MiB, Settings

KEY = "s3cret-admin-key"
DATASET_LIMIT = 6 * MiB  # above the Adult tune split as CSV (about 4 MB)
MODEL = f"adult-{uuid.uuid4().hex[:6]}"  # a name of its own on a shared REDIS_URL


def spec(name: str = MODEL, version: str = "1", url: str = "http://127.0.0.1:9000", **extra) -> dict:
    return {"name": name, "version": version, "upstream": {"url": url, "input_name": "input"}, **extra}


@pytest.fixture(scope="module")
def gateway(redis_url, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, admin_key=KEY,
                        max_dataset_bytes=DATASET_LIMIT, job_queue=f"test:{uuid.uuid4().hex[:8]}")
    with ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def registered(client):
    r = client.post("/v1/models", json=spec(groups=["Female", "Male"]))
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def adult_frame(adult) -> pd.DataFrame:
    """The Adult tune split as a user would upload it: features f0..fN, the label, the group names."""
    frame = pd.DataFrame(adult.tune.X, columns=[f"f{i}" for i in range(adult.tune.X.shape[1])])
    frame["income"] = adult.tune.y
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups]
    return frame


@pytest.fixture(scope="module")
def small_csv(adult_frame) -> bytes:
    return adult_frame.iloc[:200, [0, 1, 2, -2, -1]].to_csv(index=False).encode()


def upload(client, body: bytes, content_type: str = "text/csv", **params) -> httpx.Response:
    params = {"label": "income", "group": "sex", **params}
    return client.post("/v1/datasets", params=params, content=body, headers={"content-type": content_type})


def error(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


# --- auth ---------------------------------------------------------------------------------------------

def test_management_needs_the_admin_key(gateway):
    url = f"{gateway.url}/v1/models"
    r = httpx.get(url)
    assert r.status_code == 401 and "Authorization: Bearer" in error(r)
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(url, headers={"Authorization": "Bearer not-the-key"})
    assert r.status_code == 403 and "wrong" in error(r)
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}x"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Basic {KEY}"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # every management route, including uploads: refused before the body is read
    r = httpx.post(f"{gateway.url}/v1/datasets?label=a&group=b", content=b"a,b\n1,2\n")
    assert r.status_code == 401
    r = httpx.post(f"{gateway.url}/v1/jobs", content=b"{not json")
    assert r.status_code == 401
    # the data plane needs none
    assert httpx.get(f"{gateway.url}/v2/health/live").status_code == 200


def test_without_an_admin_key_the_control_plane_is_open(redis_url, tmp_path):
    with ServerThread(create_app(Settings(data_dir=tmp_path, redis_url=redis_url))) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_redis_down_is_503_not_500(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ServerThread(create_app(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}"))) as server:
        r = httpx.get(f"{server.url}/v1/models", timeout=20)
        assert r.status_code == 503 and "Redis is unavailable" in error(r)


# --- the upstream allow-list --------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "allowlist", "ok"), [
    ("http://127.0.0.1:9000", [], True),
    ("http://localhost:9000/v2", [], True),
    ("http://[::1]:9000", [], True),
    ("http://127.0.0.1", [], True),
    ("http://10.0.0.5:9000", [], False),
    ("http://127.0.0.1.evil.example:9000", [], False),
    ("http://127.0.0.1:9000@evil.example", [], False),
    ("http://localhost@evil.example", [], False),
    ("http://models.internal:8000/kserve", ["http://models.internal:8000"], True),
    ("http://models.internal:80001", ["http://models.internal:8000"], False),
    ("http://127.0.0.1:9000", ["http://models.internal:8000"], False),  # a list replaces the loopback default
    ("https://a.example/team/m", ["https://a.example/team/"], True),
    ("https://a.example/other", ["https://a.example/team/"], False),
])
def test_allowlist_prefixes_end_at_a_boundary(url, allowlist, ok):
    assert upstream_allowed(url, allowlist) is ok


def test_registering_an_upstream_off_the_allowlist_is_403(client):
    r = client.post("/v1/models", json=spec(name="evil", url="http://10.0.0.5:9000"))
    assert r.status_code == 403
    assert "not on the allow-list" in error(r) and "FAIRPATCH_UPSTREAM_ALLOWLIST" in error(r)
    assert client.get("/v1/models/evil/versions/1").status_code == 404


# --- models -------------------------------------------------------------------------------------------

def test_register_get_list_delete(client):
    name = f"m-{uuid.uuid4().hex[:6]}"
    r = client.post("/v1/models", json=spec(name=name, version="2"))
    assert r.status_code == 201 and r.headers["location"] == f"/v1/models/{name}/versions/2"
    body = r.json()
    assert body["upstream"]["url"] == "http://127.0.0.1:9000" and body["group_input"] == "group"
    again = client.post("/v1/models", json=spec(name=name, version="2"))
    assert again.status_code == 200 and again.json()["created_at"] == body["created_at"]  # idempotent
    r = client.post("/v1/models", json=spec(name=name, version="2", url="http://127.0.0.1:9001"))
    assert r.status_code == 409 and "already registered" in error(r)
    assert client.get(f"/v1/models/{name}/versions/2").json() == body
    assert body in client.get("/v1/models").json()["models"]
    r = client.get(f"/v1/models/{name}/versions/3")
    assert r.status_code == 404 and "registered versions: 2" in error(r)
    assert client.delete(f"/v1/models/{name}/versions/2").status_code == 204
    assert client.get(f"/v1/models/{name}/versions/2").status_code == 404
    assert client.delete(f"/v1/models/{name}/versions/2").status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty request body"),
    (b"{not json", "invalid request"),
    (b'{"name": "x"}', "upstream"),
    (b'{"name": "../etc", "upstream": {"url": "http://127.0.0.1:1"}}', "name"),
    (b'{"name": "x", "upstream": {"url": "file:///etc/passwd"}}', "http"),
    (b'{"name": "x", "upstream": {"url": "http://127.0.0.1:1", "timeout_s": -1}}', "timeout_s"),
    (b'{"name": "x", "upstream": {"url": "http://127.0.0.1:1", "protocol": "v1", "binary_data": true}}',
     "binary_data needs protocol v2"),
    (b'{"name": "x", "upstream": {"url": "http://127.0.0.1:99999"}}', "Port out of range"),
    (b'{"name": "x", "upstream": {"url": ""}}', "upstream.url"),
    (b'{"name": "x", "upstream": {"url": "http://:8000"}}', "names no host"),
])
def test_bad_model_specs_are_400(client, body, message):
    r = client.post("/v1/models", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in error(r)


# --- datasets -----------------------------------------------------------------------------------------

def test_upload_the_adult_tune_split_as_csv(client, adult, adult_frame):
    body = adult_frame.to_csv(index=False).encode()
    r = upload(client, body, name="adult tune")
    assert r.status_code == 201, r.text
    d = r.json()
    assert r.headers["location"] == f"/v1/datasets/{d['id']}"
    n_features = adult.tune.X.shape[1]
    assert d["rows"] == len(adult.tune.y) and d["bytes"] == len(body) and d["format"] == "csv"
    assert d["columns"] == [*(f"f{i}" for i in range(n_features)), "income", "sex"]
    assert d["features"] == d["columns"][:n_features] and d["name"] == "adult tune"
    assert (d["label"], d["group"], d["groups"], d["label_values"]) == ("income", "sex", ["Female", "Male"], [0, 1])
    counts = np.bincount(adult.tune.groups)
    assert d["group_counts"] == {"Female": int(counts[0]), "Male": int(counts[1])}
    assert 0 < d["stored_bytes"] < len(body) / 5  # zstd Parquet
    assert client.get(f"/v1/datasets/{d['id']}").json() == d
    assert d["id"] in [x["id"] for x in client.get("/v1/datasets").json()["datasets"]]
    assert client.delete(f"/v1/datasets/{d['id']}").status_code == 204
    r = client.get(f"/v1/datasets/{d['id']}")
    assert r.status_code == 404 and "unknown dataset" in error(r)
    assert client.delete(f"/v1/datasets/{d['id']}").status_code == 404


async def _load(redis_url: str, dataset_id: str):
    from redis.asyncio import Redis

    from service.datasets_store import DatasetStore

    redis = Redis.from_url(redis_url)
    try:
        return await DatasetStore(redis).load(dataset_id)
    finally:
        await redis.aclose()


def test_parquet_with_text_labels_round_trips_to_arrays(client, redis_url, adult_frame):
    import asyncio

    frame = adult_frame.iloc[:300].copy()
    frame["income"] = np.where(frame["income"] == 1, ">50K", "<=50K")
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    r = upload(client, buf.getvalue(), "application/vnd.apache.parquet")
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["format"] == "parquet" and d["label_values"] == ["<=50K", ">50K"]  # sorted: "<" before ">"
    loaded = asyncio.run(_load(redis_url, d["id"]))
    assert loaded.X.dtype == np.float32 and loaded.X.shape == (300, len(d["features"]))
    np.testing.assert_array_equal(loaded.X, adult_frame.iloc[:300, :-2].to_numpy(np.float32))
    np.testing.assert_array_equal(loaded.y, adult_frame["income"].iloc[:300].to_numpy())
    assert loaded.group_names == ("Female", "Male")
    np.testing.assert_array_equal(np.array(loaded.group_names)[loaded.groups], frame["sex"].to_numpy())


def _csv(text: str) -> bytes:
    return text.encode()


@pytest.mark.parametrize(("body", "params", "status", "message"), [
    (b"", {}, 400, "empty"),
    (b"\n\n", {}, 400, "empty"),
    (_csv("f0,income,sex\n"), {}, 400, "no rows"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n"), {"label": "salary"}, 400, "unknown label column 'salary'"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n"), {"group": "race"}, 400, "unknown group column 'race'"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n"), {"group": "income"}, 400, "must be different"),
    (_csv("income,sex\n0,a\n1,b\n"), {}, 400, "no feature columns"),
    (_csv("f0,city,income,sex\n1,Paris,0,a\n2,Rome,1,b\n"), {}, 400, "not numeric"),
    (_csv("f0,f1,income,sex\n1,,0,a\n2,3,1,b\n"), {}, 400, "'f1'"),
    (_csv("f0,income,sex\n1,0,a\nnan,1,b\n"), {}, 400, "missing, infinite"),
    (_csv("f0,income,sex\n1,0,a\ninf,1,b\n"), {}, 400, "missing, infinite"),
    (_csv("f0,income,sex\n1,0,a\n1e300,1,b\n"), {}, 400, "out-of-range"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n3,2,b\n"), {}, 400, "must be binary"),
    (_csv("f0,income,sex\n1,0,a\n2,0,b\n"), {}, 400, "must be binary"),
    (_csv("f0,income,sex\n1,0,a\n2,,b\n"), {}, 400, "missing value"),
    (_csv("f0,income,sex\n1,0,a\n2,1,\n"), {}, 400, "group column 'sex' has 1 missing"),
    (_csv("f0,income,sex\n1,0,a\n2,1,a\n"), {}, 400, "single group"),
    (_csv("f0,f0,income,sex\n1,1,0,a\n2,2,1,b\n"), {}, 400, "repeats column"),
    (_csv('f0,income,sex\n1,0,"a\n'), {}, 400, "malformed"),
    ("f0,income,sex\n1,0,Fémale\n2,1,Male\n".encode("latin-1"), {}, 400, "not valid UTF-8"),
    (b"PAR1 this is not parquet", {"ct": "application/vnd.apache.parquet"}, 400, "not a readable Parquet"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n"), {"ct": "application/json"}, 415, "unsupported content type"),
    (_csv("f0,income,sex\n1,0,a\n2,1,b\n"), {"ct": ""}, 415, "text/csv"),
])
def test_malformed_datasets_are_refused_with_a_clear_4xx(client, body, params, status, message):
    params = dict(params)
    content_type = params.pop("ct", "text/csv")
    r = upload(client, body, content_type, **params)
    assert r.status_code == status, r.text
    assert message in error(r)


def test_label_and_group_parameters_are_required(client, small_csv):
    r = client.post("/v1/datasets", params={"label": "income"}, content=small_csv,
                    headers={"content-type": "text/csv"})
    assert r.status_code == 400 and "group" in error(r)


def test_a_utf8_bom_and_bool_features_are_fine(client):
    r = upload(client, "\ufefff0,f1,income,sex\n1.5,true,0,Fémale\n2,false,1,Male\n".encode())
    assert r.status_code == 201, r.text
    assert r.json()["groups"] == ["Fémale", "Male"] and r.json()["features"] == ["f0", "f1"]


def test_oversize_dataset_is_413_declared_or_streamed(client):
    row = b"1.0,0,a\n2.0,1,b\n"
    big = b"f0,income,sex\n" + row * (DATASET_LIMIT // len(row) + 10)
    r = upload(client, big)
    assert r.status_code == 413 and f"{DATASET_LIMIT}-byte limit" in error(r)

    def chunks():  # no Content-Length: counted as it streams in
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = client.post("/v1/datasets", params={"label": "income", "group": "sex"}, content=chunks(),
                    headers={"content-type": "text/csv"})
    assert r.status_code == 413 and "limit" in error(r)
    assert client.get("/v1/models").status_code == 200  # the gateway carries on


# --- job validation (jobs that run are in test_service_jobs.py) ----------------------------------------

@pytest.fixture(scope="module")
def dataset_id(client, small_csv):
    r = upload(client, small_csv)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job(dataset_id: str, **overrides) -> dict:
    return {"model": MODEL, "version": "1", "method": "eraser", "dataset": dataset_id, "criterion": "dp",
            "query_budget": 100, **overrides}


@pytest.mark.parametrize(("overrides", "status", "message"), [
    ({"model": "nope"}, 404, "unknown model 'nope'"),
    ({"version": "9"}, 404, "version '9'"),
    ({"dataset": "0" * 32}, 404, "unknown dataset"),
    ({"method": "magic"}, 400, "unknown method 'magic'; available: "),
    ({"criterion": "vibes"}, 400, "criterion"),
    ({"query_budget": 0}, 400, "query_budget"),
    ({"query_budget": -5}, 400, "query_budget"),
    ({"holdout": 1.0}, 400, "holdout"),
    ({"options": {"seed": 3}}, 400, "unknown option(s) seed for eraser; valid options: bias, proxy_columns"),
    ({"options": "group"}, 400, "options"),
    ({"options": {"bais": "group"}}, 400, "unknown option(s) bais for eraser"),
    ({"preset": "colored-digits"}, 400, "method eraser has no preset 'colored-digits'; its presets: none"),
    ({"options": {"bias": "vibes"}}, 400, "invalid options for eraser: bias"),
    ({"budget": 100}, 400, "budget"),  # unknown fields are typos, not silently ignored
])
def test_invalid_jobs_are_refused_before_queueing(client, registered, dataset_id, overrides, status, message):
    before = len(client.get("/v1/jobs").json()["jobs"])
    r = client.post("/v1/jobs", json=job(dataset_id, **overrides))
    assert r.status_code == status, r.text
    assert message in error(r)
    assert len(client.get("/v1/jobs").json()["jobs"]) == before


def test_a_dataset_with_groups_the_model_does_not_know_is_refused(client, registered):
    r = upload(client, b"f0,income,sex\n1,0,Female\n2,1,Other\n")
    r = client.post("/v1/jobs", json=job(r.json()["id"]))
    assert r.status_code == 400 and "'Other'" in error(r)


def test_unknown_jobs_are_404(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    r = client.delete("/v1/jobs/nope")
    assert r.status_code == 404 and "unknown job" in error(r)


# --- patches ------------------------------------------------------------------------------------------

def make_patch(alpha: float = 1.0) -> Patch:
    graph = build_output_graph(3, 2, alpha, 0.0, "group", np.log(np.array([[0.7, 0.3], [0.4, 0.6]])))
    return Patch.build(method="eraser", n_classes=2, groups=["Female", "Male"], group_at_inference=True,
                       output_transform=graph, report={"criterion": "dp"})


def post_patch(client, data: bytes, version: str = "1", content_type: str = "application/zip") -> httpx.Response:
    return client.post(f"/v1/models/{MODEL}/versions/{version}/patches", content=data,
                       headers={"content-type": content_type})


def test_patch_upload_list_activate_download_deactivate(client, registered):
    base = f"/v1/models/{MODEL}/versions/1/patches"
    bound = make_patch(1.5).for_model(MODEL, "1")
    r = post_patch(client, bound.to_bytes())
    assert r.status_code == 201, r.text
    assert r.json() == {"id": bound.id, "model": MODEL, "version": "1", "method": "eraser"}
    unbound = make_patch(2.5)
    r = post_patch(client, unbound.to_bytes(), content_type="application/octet-stream")
    assert r.status_code == 201
    rebound = unbound.for_model(MODEL, "1")
    assert r.json()["id"] == rebound.id  # bound to this version on the way in

    listing = client.get(base).json()
    assert listing["active"] is None
    assert [p["id"] for p in listing["patches"]] == [bound.id, rebound.id]
    assert listing["patches"][0] | {"created_at": 0} == {
        "id": bound.id, "method": "eraser", "created_at": 0, "group_at_inference": True,
        "groups": ["Female", "Male"], "criterion": "dp"}

    r = client.post(f"{base}/{bound.id}/activate")
    assert r.status_code == 200 and r.json() == {"model": MODEL, "version": "1", "active": bound.id}
    assert client.get(base).json()["active"] == bound.id

    r = client.get(f"/v1/patches/{bound.id}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.content == bound.to_bytes()
    assert r.headers["fairpatch-patch-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert Patch.from_bytes(r.content, expected_id=bound.id).manifest["model"] == {"name": MODEL, "version": "1"}

    r = client.post(f"{base}/deactivate")
    assert r.status_code == 200 and r.json()["active"] is None
    assert client.get(base).json()["active"] is None


def test_a_patch_bound_to_another_version_is_refused(client, registered):
    other = make_patch(3.0).for_model(MODEL, "2")
    r = post_patch(client, other.to_bytes())
    assert r.status_code == 409 and "not " + MODEL + " version 1" in error(r)
    # stored under its own version, it still cannot be activated on this one
    assert client.post("/v1/models", json=spec(version="2")).status_code == 201
    assert post_patch(client, other.to_bytes(), version="2").status_code == 201
    r = client.post(f"/v1/models/{MODEL}/versions/1/patches/{other.id}/activate")
    assert r.status_code == 409 and "version 2" in error(r)


def test_bad_patches_and_unknown_ids(client, registered):
    r = post_patch(client, b"not a zip at all")
    assert r.status_code == 400 and "not a valid patch" in error(r)
    r = post_patch(client, b"")
    assert r.status_code == 400
    r = post_patch(client, make_patch().to_bytes(), content_type="text/csv")
    assert r.status_code == 415
    r = client.post(f"/v1/models/{MODEL}/versions/1/patches/{'0' * 64}/activate")
    assert r.status_code == 404 and "unknown patch" in error(r)
    assert client.get(f"/v1/patches/{'0' * 64}").status_code == 404
    r = client.get("/v1/models/nope/versions/1/patches")
    assert r.status_code == 404 and "unknown model 'nope'" in error(r)
    r = client.post("/v1/models/nope/versions/1/patches", content=make_patch().to_bytes())
    assert r.status_code == 404
