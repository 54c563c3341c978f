"""Live fairness and safe rollout end to end: two real gateway replicas (uvicorn on loopback) sharing one
real Redis, a real ONNX upstream, real patches.

The upstream decides positive exactly when the first feature is above 0, so a stream's decisions are known
row by row: the counts the gateways merge in Redis must be exactly what was sent, and the stream's true dp
gap must lie in the interval the gateway reports.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import numpy as np
import pytest

from patcher.apply import PatchRunner
from patcher.methods import eraser
from patcher.onnx_graphs import mlp_model
from patcher.patch import Patch
from patcher.scores import to_log_probs
from service import rollout
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.serve_thread import ServerThread
from service.settings import Settings
from tests.processes import until

RUN = uuid.uuid4().hex[:6]
GROUPS = ["a", "b"]


def sign_model() -> bytes:
    """[N, 2] in, logits [0, x0]: positive exactly when x0 > 0."""
    return mlp_model([(np.array([[0.0, 1.0], [0.0, 0.0]]), np.zeros(2))])


def group_patch() -> Patch:
    """An Eraser-style output patch over the groups a and b (it moves group a's decisions)."""
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    graph = eraser.build_output_graph(2, 2, alpha=1.0, threshold=0.5, bias="group", table=table)
    return Patch.build(method="eraser", n_classes=2, groups=GROUPS, group_at_inference=True, output_transform=graph)


@pytest.fixture(scope="module")
def upstream():
    with ServerThread(create_upstream_app(OnnxModel(sign_model(), name="sign"))) as server:
        yield server.url


@pytest.fixture(scope="module")
def gateways(redis_url, upstream, tmp_path_factory):
    """Two replicas on one Redis, flushing fast (the test waits on the merged counts, never on time)."""
    def settings() -> Settings:
        return Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, live_flush_s=0.05,
                        live_check_s=0.1, live_alert_gap=0.1)

    app = create_app(settings())
    with ServerThread(app) as one, ServerThread(create_app(settings())) as two, \
            httpx.Client(base_url=one.url, timeout=30) as c1, httpx.Client(base_url=two.url, timeout=30) as c2:
        yield c1, c2, app


def register(client: httpx.Client, upstream: str, name: str) -> str:
    spec = {"name": name, "version": "1", "groups": GROUPS,
            "upstream": {"url": upstream, "model_name": "sign", "input_name": "input", "output_name": "logits",
                         "output_kind": "logits"}}
    r = client.post("/v1/models", json=spec)
    assert r.status_code == 201, r.text
    return name


def body(X: np.ndarray, groups: list[str], rid: str | None = None) -> dict:
    b = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()},
                    {"name": "group", "datatype": "BYTES", "shape": [len(groups)], "data": groups}]}
    if rid is not None:
        b["id"] = rid
    return b


def stream(n: int, rates: dict[str, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n rows, half per group, positive (x0 = +1) with each group's probability; x1 is noise."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(2), n // 2)
    pos = rng.random(n) < np.where(g == 0, rates["a"], rates["b"])
    X = np.stack([np.where(pos, 1.0, -1.0), rng.normal(size=n)], axis=1).astype(np.float32)
    return X, g


def fairness(client: httpx.Client, model: str) -> dict:
    r = client.get(f"/v1/models/{model}/versions/1/fairness")
    assert r.status_code == 200, r.text
    return r.json()


def arm(figures: dict, name: str) -> dict | None:
    return next((a for a in figures["arms"] if a["arm"] == name), None)


def rows_seen(client: httpx.Client, model: str, name: str, n: int) -> dict | None:
    """The figures once arm `name` has merged `n` rows (flushes land a moment after the answers)."""
    figures = fairness(client, model)
    a = arm(figures, name)
    return figures if a is not None and a["rows"] >= n else None


def test_live_dp_of_a_biased_stream_merges_both_replicas_within_its_ci(gateways, upstream, caplog):
    caplog.set_level(logging.INFO, logger="fairpatch.service")  # whatever another module did to the root level
    c1, c2, app = gateways
    model = register(c1, upstream, f"live-dp-{RUN}")
    heard: list[tuple[str, bool]] = []
    app.state.live.on_drift(lambda m, v, arms: heard.append((m, any(a.drifting for a in arms))))
    X, g = stream(1200, {"a": 0.6, "b": 0.3}, seed=1)
    names = [GROUPS[i] for i in g]
    order = np.random.default_rng(2).permutation(len(X))
    for k, chunk in enumerate(np.array_split(order, 40)):  # alternate replicas, 30 rows a request
        r = (c1, c2)[k % 2].post(f"/v2/models/{model}/infer", json=body(X[chunk], [names[i] for i in chunk]))
        assert r.status_code == 200, r.text
    figures = until(lambda: rows_seen(c2, model, "active", len(X)), "the merged counts")
    a = arm(figures, "active")
    assert a["rows"] == len(X) and a["rows_by_group"] == {"a": 600, "b": 600} and a["patch"] is None
    sent = {name: float((X[g == i, 0] > 0).mean()) for i, name in enumerate(GROUPS)}
    served = a["outputs"]["served"]
    assert served["selection_rate"] == pytest.approx(sent, abs=1e-6)
    assert served["dp_gap"] == pytest.approx(sent["a"] - sent["b"], abs=1e-6)
    lo, hi = served["dp_gap_ci"]
    assert lo < 0.3 < hi and lo < served["dp_gap"] < hi  # the stream's true gap is in the interval
    assert a["outputs"]["raw"] == served  # unpatched: the raw answer is what was served
    # gap 0.3 is above the alert threshold 0.1 with confidence: the version is drifting, and a replica logs it
    assert figures["drifting"] and a["drifting"] and figures["alert_gap"] == 0.1
    until(lambda: any("is drifting" in r.getMessage() and model in r.getMessage() for r in caplog.records),
          "the drift log line")
    until(lambda: (model, True) in heard, "the drift listener (the hook metrics use)")
    from prometheus_client.parser import text_string_to_metric_families

    def drifting_gauge() -> float | None:
        families = text_string_to_metric_families(c1.get("/metrics").text)
        return next((s.value for f in families for s in f.samples
                     if s.name == "fairpatch_live_drifting" and s.labels.get("model") == model), None)

    until(lambda: drifting_gauge() == 1.0, "the drifting gauge at /metrics")


def test_feedback_labels_give_eo_tpr_fpr_and_accuracy(gateways, upstream):
    c1, c2, _ = gateways
    model = register(c1, upstream, f"live-eo-{RUN}")
    X, g = stream(400, {"a": 0.5, "b": 0.5}, seed=3)
    y = np.random.default_rng(4).integers(0, 2, len(X))
    ids = [f"eo-{RUN}-{i}" for i in range(0, len(X), 4)]
    for k, rid in enumerate(ids):  # four rows a request, served by replica 1
        rows = slice(4 * k, 4 * k + 4)
        r = c1.post(f"/v2/models/{model}/infer", json=body(X[rows], [GROUPS[i] for i in g[rows]], rid))
        assert r.status_code == 200, r.text
    until(lambda: rows_seen(c2, model, "active", len(X)), "the requests' flush")
    # labels go to the other replica: the join is through Redis; one id is unknown, one has the wrong count
    feedback = [{"request_id": rid, "label": y[4 * k:4 * k + 4].tolist()} for k, rid in enumerate(ids)]
    r = c2.post("/v1/feedback", json={"feedback": [*feedback, {"request_id": "never-sent", "label": 1}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"labelled_rows": len(X), "unknown": ["never-sent"], "mismatched": []}
    again = c1.post("/v1/feedback", json={"feedback": feedback[:1]}).json()
    assert again["labelled_rows"] == 0 and again["unknown"] == [ids[0]]  # a request is labelled once
    bad = c1.post("/v1/feedback", json={"feedback": [{"request_id": "x", "label": 2}]})
    assert bad.status_code == 400 and "0 or 1" in bad.json()["error"]

    served = arm(fairness(c1, model), "active")
    assert served["labelled"] == len(X)
    out = served["outputs"]["served"]
    d = (X[:, 0] > 0).astype(int)
    tpr = {n: float(d[(g == i) & (y == 1)].mean()) for i, n in enumerate(GROUPS)}
    fpr = {n: float(d[(g == i) & (y == 0)].mean()) for i, n in enumerate(GROUPS)}
    assert out["tpr"] == pytest.approx(tpr, abs=1e-6) and out["fpr"] == pytest.approx(fpr, abs=1e-6)
    eo = max(abs(tpr["a"] - tpr["b"]), abs(fpr["a"] - fpr["b"]))
    assert out["eo_gap"] == pytest.approx(eo, abs=1e-6)
    assert out["accuracy"] == pytest.approx(float((d == y).mean()), abs=1e-6)


def offline(patch: Patch, X: np.ndarray, names: list[str], rid: str) -> np.ndarray:
    logits = np.stack([np.zeros(len(X)), X[:, 0]], axis=1)
    return PatchRunner(patch).predict(X, to_log_probs(logits, "logits"), np.array(names, dtype=object), rid)


def test_shadow_serves_raw_and_records_the_patch_beside_it(gateways, upstream):
    c1, c2, _ = gateways
    model = register(c1, upstream, f"live-shadow-{RUN}")
    patch = group_patch()
    r = c1.post(f"/v1/models/{model}/versions/1/patches", content=patch.to_bytes(),
                headers={"content-type": "application/zip"})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    promoted = c1.post(f"/v1/models/{model}/versions/1/patches/{pid}/promote")
    assert promoted.status_code == 200 and promoted.json() == {"patch": pid, "stage": "shadow", "percent": None}
    bound = Patch.from_bytes(c1.get(f"/v1/patches/{pid}").content)
    X, g = stream(200, {"a": 0.5, "b": 0.5}, seed=5)
    names = [GROUPS[i] for i in g]
    patched = 0
    for i in range(len(X)):
        rid = f"shadow-{RUN}-{i}"
        r = (c1, c2)[i % 2].post(f"/v2/models/{model}/infer", json=body(X[i:i + 1], names[i:i + 1], rid))
        assert r.status_code == 200 and r.headers["fairpatch-patch"] == "none"  # the raw model served
        assert r.json()["outputs"][0]["data"] == pytest.approx([0.0, float(X[i, 0])])
        patched += int(offline(bound, X[i:i + 1], names[i:i + 1], rid)[0])
    figures = until(lambda: rows_seen(c1, model, "shadow", len(X)), "the shadow arm's counts")
    a = arm(figures, "shadow")
    assert a["patch"] == pid and figures["rollout"]["stage"] == "shadow"
    assert set(a["outputs"]) == {"raw", "served", "patched"}
    rates = a["outputs"]["patched"]["selection_rate"]
    assert round(rates["a"] * 100 + rates["b"] * 100) == patched  # 100 rows a group: the patch's positives
    assert a["outputs"]["served"]["selection_rate"]["a"] == pytest.approx(float((X[g == 0, 0] > 0).mean()))


def test_canary_splits_10000_requests_by_the_hash_rule_and_records_both_arms(gateways, upstream):
    c1, c2, _ = gateways
    model = register(c1, upstream, f"live-canary-{RUN}")
    r = c1.post(f"/v1/models/{model}/versions/1/patches", content=group_patch().to_bytes(),
                headers={"content-type": "application/zip"})
    pid = r.json()["id"]
    r = c1.post(f"/v1/models/{model}/versions/1/patches/{pid}/promote", json={"stage": "canary", "percent": 25})
    assert r.status_code == 200 and r.json() == {"patch": pid, "stage": "canary", "percent": 25.0}
    n = 10_000
    ids = [f"canary-{RUN}-{i}" for i in range(n)]
    expected = sum(rollout.bucket(rid) < 2500 for rid in ids)  # the rule, computed here
    assert abs(expected / n - 0.25) <= 0.02
    headers: dict[str, int] = {}

    async def send() -> None:
        clients = [httpx.AsyncClient(base_url=str(c.base_url), timeout=60) for c in (c1, c2)]
        queue = list(enumerate(ids))

        async def worker() -> None:
            while queue:
                i, rid = queue.pop()
                row = np.array([[1.0 if i % 3 else -1.0, 0.0]])
                r = await clients[i % 2].post(f"/v2/models/{model}/infer", json=body(row, [GROUPS[i % 2]], rid))
                assert r.status_code == 200, r.text
                key = r.headers["fairpatch-patch"]
                headers[key] = headers.get(key, 0) + 1

        try:
            await asyncio.gather(*(worker() for _ in range(8)))
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(send())
    assert headers == {pid: expected, "none": n - expected}
    figures = until(lambda: rows_seen(c1, model, "control", n - expected) and rows_seen(c1, model, "canary", expected),
                    "both arms' counts")
    canary, control = arm(figures, "canary"), arm(figures, "control")
    assert canary["rows"] == expected and control["rows"] == n - expected
    assert canary["patch"] == control["patch"] == pid
    assert set(canary["outputs"]) == set(control["outputs"]) == {"raw", "served"}


def test_promote_refuses_bad_input_and_moves_along(gateways, upstream):
    c1, _, _ = gateways
    model = register(c1, upstream, f"live-promote-{RUN}")
    pid = c1.post(f"/v1/models/{model}/versions/1/patches", content=group_patch().to_bytes(),
                  headers={"content-type": "application/zip"}).json()["id"]
    base = f"/v1/models/{model}/versions/1/patches"
    assert c1.post(f"{base}/{'0' * 64}/promote").status_code == 404
    bad = c1.post(f"{base}/{pid}/promote", json={"stage": "sideways"})
    assert bad.status_code == 400 and "stage" in bad.json()["error"]
    stages = [c1.post(f"{base}/{pid}/promote").json()["stage"] for _ in range(4)]
    assert stages == ["shadow", "canary", "active", "active"]
    listed = c1.get(base).json()
    assert listed["active"] == pid and listed["rollout"] == {"patch": pid, "stage": "active", "percent": None}


def test_the_canary_rule_is_within_two_points_at_10000_ids():
    for percent in (5, 10, 25, 50, 90):
        share = sum(rollout.patched_arm(f"req-{i}", percent) for i in range(10_000)) / 10_000
        assert abs(share - percent / 100) <= 0.02


def cli(capsys, *argv: str) -> tuple[int, str]:
    from clients.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out + out.err


def test_the_cli_promotes_and_shows_the_arms_side_by_side(gateways, upstream, capsys):
    c1, _, _ = gateways
    model = register(c1, upstream, f"live-cli-{RUN}")
    url = str(c1.base_url).rstrip("/")
    pid = c1.post(f"/v1/models/{model}/versions/1/patches", content=group_patch().to_bytes(),
                  headers={"content-type": "application/zip"}).json()["id"]
    code, out = cli(capsys, "--url", url, "patches", "promote", model, pid, "--stage", "canary", "--percent", "50")
    assert code == 0 and "is now canary (50% of requests)" in out
    X, g = stream(40, {"a": 0.5, "b": 0.5}, seed=7)
    for i in range(len(X)):
        r = c1.post(f"/v2/models/{model}/infer", json=body(X[i:i + 1], [GROUPS[g[i]]], f"cli-{RUN}-{i}"))
        assert r.status_code == 200
    expected = sum(rollout.bucket(f"cli-{RUN}-{i}") < 5000 for i in range(len(X)))
    until(lambda: rows_seen(c1, model, "canary", expected) and rows_seen(c1, model, "control", len(X) - expected),
          "both arms")
    code, out = cli(capsys, "--url", url, "patches", "fairness", model)
    assert code == 0
    assert "canary served" in out and "control served" in out and "dp gap 95% CI" in out
    assert "selection rate a" in out and "selection rate b" in out


def test_requests_are_counted_in_process_and_reach_redis_only_when_flushed(gateways, upstream, redis_url,
                                                                           tmp_path):
    from redis import Redis

    c1, _, _ = gateways
    model = register(c1, upstream, f"live-flush-{RUN}")
    # a replica that never flushes while it runs: only its shutdown writes its counts
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, live_flush_s=3600, live_check_s=3600)
    redis = Redis.from_url(redis_url)

    def writes() -> int:
        stats = redis.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hincrby", "set"))

    try:
        with ServerThread(create_app(settings)) as quiet, httpx.Client(base_url=quiet.url, timeout=30) as c3:
            before = writes()
            X, g = stream(60, {"a": 0.5, "b": 0.5}, seed=8)
            for i in range(len(X)):
                r = c3.post(f"/v2/models/{model}/infer", json=body(X[i:i + 1], [GROUPS[g[i]]], f"q-{RUN}-{i}"))
                assert r.status_code == 200
            # sixty answers, and no count or request id written to Redis for them (a margin for anything else
            # writing to a shared REDIS_URL meanwhile; a write per request would be 60 or more)
            assert writes() - before < 10
            assert arm(fairness(c1, model), "active") is None
        figures = fairness(c1, model)  # the replica stopped: its last flush is there for every replica to read
        assert arm(figures, "active")["rows"] == len(X)
    finally:
        redis.close()


def estimator_patch() -> Patch:
    """An Eraser patch with an attribute estimator: group a exactly when x1 > 0 (no group at inference)."""
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    W, b = np.array([[0.0, 0.0], [5.0, -5.0]]), np.zeros(2)
    graph = eraser.build_output_graph(2, 2, alpha=1.0, threshold=0.5, bias="estimator", table=table, W=W, b=b)
    return Patch.build(method="eraser", n_classes=2, groups=GROUPS, group_at_inference=False, output_transform=graph,
                       params={"bias": "estimator"})


def test_requests_without_a_group_are_counted_by_the_patch_estimate_marked_estimated(gateways, upstream):
    c1, c2, _ = gateways
    model = register(c1, upstream, f"live-est-{RUN}")
    base = f"/v1/models/{model}/versions/1/patches"
    pid = c1.post(base, content=estimator_patch().to_bytes(), headers={"content-type": "application/zip"}).json()["id"]
    assert c1.post(f"{base}/{pid}/activate").status_code == 200
    rng = np.random.default_rng(9)
    X = np.stack([np.where(rng.random(300) < 0.5, 1.0, -1.0), rng.normal(size=300)], axis=1).astype(np.float32)
    for k, rows in enumerate(np.array_split(np.arange(len(X)), 30)):
        b = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), 2],
                         "data": X[rows].ravel().tolist()}]}  # no group input
        r = (c1, c2)[k % 2].post(f"/v2/models/{model}/infer", json=b)
        assert r.status_code == 200 and r.headers["fairpatch-patch"] == pid
    figures = until(lambda: rows_seen(c1, model, "active", len(X)), "the estimated counts")
    a = arm(figures, "active")
    assert a["group_source"] == "estimated" and a["patch"] == pid
    estimated_a = int((X[:, 1] > 0).sum())
    assert a["rows_by_group"] == {"a": estimated_a, "b": len(X) - estimated_a}
    raw = a["outputs"]["raw"]["selection_rate"]
    assert raw["a"] == pytest.approx(float((X[X[:, 1] > 0, 0] > 0).mean()), abs=1e-6)


def test_the_fairness_window_is_at_most_the_configured_one(gateways, upstream):
    # Buckets older than the configured window have expired; a larger asked window once walked one Redis
    # key per bucket back as far as asked (schemathesis' 1e15 s took the test process to 23 GB).
    c1, _, app = gateways
    model = register(c1, upstream, f"live-window-{RUN}")
    configured = app.state.live.window_s
    for asked in (configured * 10, 1e15):
        r = c1.get(f"/v1/models/{model}/versions/1/fairness", params={"window_s": asked})
        assert r.status_code == 200, r.text
        assert r.json()["window_s"] == configured
    r = c1.get(f"/v1/models/{model}/versions/1/fairness", params={"window_s": configured / 2})
    assert r.status_code == 200 and r.json()["window_s"] == configured / 2
    for bad in ("inf", "nan", "0", "-5"):
        r = c1.get(f"/v1/models/{model}/versions/1/fairness", params={"window_s": bad})
        assert r.status_code == 400 and "window_s" in r.json()["error"], (bad, r.text)
