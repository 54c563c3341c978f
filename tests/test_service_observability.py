"""Metrics and payload logging over real servers on loopback: the gateway (uvicorn in a thread), the local ONNX
upstream, real Redis, and a CloudEvents sink (a real HTTP server) that records what it receives.

Known traffic goes through the gateway; `/metrics` is parsed with prometheus-client's own parser and its counts
checked exactly. Every wait is on a condition (the metrics or the sink reaching a count), never on a sleep.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from prometheus_client.parser import text_string_to_metric_families

from patcher.methods.eraser import build_output_graph
from patcher.patch import Patch
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.serve_thread import ServerThread
from service.settings import Settings
from tests.conftest import random_mlp
from tests.processes import ready, served, until

REPO = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:6]


class Sink:
    """A CloudEvents sink: records each POST's headers and body; while `gate` is clear it holds them."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.held = 0
        self.gate = threading.Event()
        self.gate.set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.held += 1
        while not self.gate.is_set():  # the server's loop polls the test's gate
            await asyncio.sleep(0.01)
        self.held -= 1
        self.received.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def table_patch(model: str) -> Patch:
    graph = build_output_graph(5, 2, 1.0, 0.25, "group", np.log(np.array([[0.8, 0.2], [0.5, 0.5]])))
    return Patch.build(method="eraser", n_classes=2, groups=["a", "b"], group_at_inference=True,
                       output_transform=graph, report={"criterion": "dp"}).for_model(model, "1")


def v2(rows: int, groups: bool = False, rid: str | None = None) -> dict:
    body = {"inputs": [{"name": "input", "shape": [rows, 5], "datatype": "FP32", "data": [0.1] * (5 * rows)}]}
    if groups:
        body["inputs"].append({"name": "group", "shape": [rows], "datatype": "BYTES", "data": ["a", "b"] * (rows // 2)})
    if rid:
        body["id"] = rid
    return body


def register(client: httpx.Client, name: str, url: str) -> None:
    spec = {"name": name, "version": "1", "groups": ["a", "b"],
            "upstream": {"url": url, "model_name": "mlp", "output_kind": "logits", "timeout_s": 10}}
    r = client.post("/v1/models", json=spec)
    assert r.status_code == 201, r.text


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream():
    with ServerThread(create_upstream_app(OnnxModel(random_mlp(5), name="mlp"))) as server:
        yield server.url


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    with ServerThread(s) as server:
        s.url = server.url
        yield s


@pytest.fixture(scope="module")
def gateway(redis_url, tmp_path_factory, sink):
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=redis_url, job_queue=f"obs:{RUN}",
                        payload_log_url=sink.url + "/events", payload_log_source="test-gateway")
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_metrics_count_known_traffic_exactly(gateway, upstream, sink):
    model, broken = f"obs-{RUN}", f"obs-down-{RUN}"
    register(gateway, model, upstream)
    register(gateway, broken, f"http://127.0.0.1:{dead_port()}")
    infer = f"/v2/models/{model}/versions/1/infer"
    for _ in range(3):
        assert gateway.post(infer, json=v2(2)).status_code == 200
    r = gateway.post(f"/v1/models/{model}/versions/1/patches", content=table_patch(model).to_bytes(),
                     headers={"content-type": "application/zip"})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert gateway.post(f"/v1/models/{model}/versions/1/patches/{pid}/activate").status_code == 200
    for _ in range(4):
        r = gateway.post(infer, json=v2(2, groups=True))
        assert r.status_code == 200 and r.headers["fairpatch-patch"] == pid
    for _ in range(2):
        r = gateway.post(f"/v1/models/{model}:predict", json={"instances": [[0.1] * 5], "groups": ["a"]})
        assert r.status_code == 200, r.text
    bad = v2(2, groups=True)
    bad["inputs"][1]["data"] = ["a", "zz"]
    assert gateway.post(infer, json=bad).status_code == 400  # unknown group, refused before the upstream
    for _ in range(2):
        assert gateway.post(f"/v2/models/nope-{uuid.uuid4().hex}/infer", json=v2(1)).status_code == 404
    assert gateway.post(f"/v2/models/{broken}/versions/1/infer", json=v2(1)).status_code == 502

    def recorded(s) -> bool:  # every request above is in (each is recorded as its answer goes out)
        return (value(s, "fairpatch_request_seconds_count", model=model, version="1", route="v2_infer") == 8
                and value(s, "fairpatch_request_seconds_count", model=model, version="1", route="v1_predict") == 2
                and value(s, "fairpatch_request_seconds_count", model=broken, version="1", route="v2_infer") == 1)

    until(lambda: recorded(scrape(gateway)), "the requests in the metrics")
    s = scrape(gateway)

    def requests(patch: str, route: str, status: str, m: str = model, version: str = "1") -> float:
        return value(s, "fairpatch_requests_total", model=m, version=version, patch=patch, route=route, status=status)

    assert requests("", "v2_infer", "200") == 3
    assert requests(pid, "v2_infer", "200") == 4
    assert requests(pid, "v1_predict", "200") == 2
    assert requests(pid, "v2_infer", "400") == 1
    assert requests("", "v2_infer", "404", m="", version="") >= 2  # other tests' unknown names count here too
    assert value(s, "fairpatch_request_seconds_count", model=model, version="1", route="v2_infer") == 3 + 4 + 1
    assert value(s, "fairpatch_request_seconds_count", model=model, version="1", route="v1_predict") == 2
    assert value(s, "fairpatch_upstream_seconds_count", model=model, version="1") == 3 + 4 + 2  # not the 400
    assert value(s, "fairpatch_patch_seconds_count", model=model, version="1") == 4 + 2
    assert value(s, "fairpatch_upstream_errors_total", model=broken, version="1", kind="unreachable") == 1
    assert value(s, "fairpatch_upstream_errors_total", model=model, version="1", kind="unreachable") == 0
    assert value(s, "fairpatch_patch_activations_total", model=model, version="1", patch=pid) == 1
    assert value(s, "fairpatch_job_queue_depth") == 0 and ("fairpatch_jobs_running", frozenset()) in s
    # the histograms' buckets are cumulative and end at the count
    assert value(s, "fairpatch_request_seconds_bucket", model=model, version="1", route="v1_predict", le="+Inf") == 2

    # every 200 went to the sink as a request/response pair: 3 + 4 + 2 requests
    until(lambda: sum(h.get("ce-inferenceservicename") == model for h, _ in sink.received) == 2 * 9,
          "the payload events")


def test_payload_events_carry_kserve_headers_and_the_served_bodies(gateway, upstream, sink):
    model = f"obs-ce-{RUN}"
    register(gateway, model, upstream)
    body = v2(2, rid="body-id")
    r = gateway.post(f"/v2/models/{model}/versions/1/infer", json=body, headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    r2 = gateway.post(f"/v2/models/{model}/versions/1/infer", json=body)  # no header: the V2 id
    assert r2.status_code == 200
    mine = lambda: [(h, b) for h, b in sink.received if h.get("ce-inferenceservicename") == model]  # noqa: E731
    until(lambda: len(mine()) == 4, "four events")
    by_id: dict[str, dict[str, tuple[dict, bytes]]] = {}
    for headers, data in mine():
        by_id.setdefault(headers["ce-id"], {})[headers["ce-type"]] = (headers, data)
    assert set(by_id) == {"req-42", "body-id"}
    request_headers, request_body = by_id["req-42"]["org.kubeflow.serving.inference.request"]
    response_headers, response_body = by_id["req-42"]["org.kubeflow.serving.inference.response"]
    assert request_headers["ce-specversion"] == "1.0" and request_headers["ce-source"] == "test-gateway"
    assert request_headers["ce-endpoint"] == "default" and request_headers["ce-component"] == "predictor"
    assert request_headers["ce-modelversion"] == "1" and request_headers["ce-fairpatchpatch"] == "none"
    assert request_headers["content-type"] == "application/json" and "ce-time" in request_headers
    assert httpx.Response(200, content=request_body).json() == body
    assert response_body == r.content and response_headers["content-type"] == "application/json"
    # a CloudEvents consumer reads it back
    event = from_binary(HTTPMessage(response_headers, response_body), JSONFormat())
    assert event.get_type() == "org.kubeflow.serving.inference.response" and event.get_id() == "req-42"
    assert event.get_extension("inferenceservicename") == model
    assert by_id["body-id"]["org.kubeflow.serving.inference.response"][1] == r2.content


def test_a_stuck_sink_drops_events_counted_and_never_delays_predictions(redis_url, tmp_path, upstream):
    stuck = Sink()
    stuck.gate.clear()
    with ServerThread(stuck) as sink_server:
        # a post timeout far off: the held posts must stay held however slowly this machine runs the test
        settings = Settings(data_dir=tmp_path, redis_url=redis_url, payload_log_url=sink_server.url,
                            payload_log_queue=1, payload_log_timeout_s=600)
        with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
            model = f"obs-drop-{RUN}"
            register(c, model, upstream)
            before = scrape(c)
            for _ in range(10):
                assert c.post(f"/v2/models/{model}/versions/1/infer", json=v2(1)).status_code == 200
            until(lambda: stuck.held == 4, "the four senders held at the sink")
            until(lambda: value(scrape(c), "fairpatch_requests_total", model=model, version="1", patch="",
                                route="v2_infer", status="200") == 10, "the requests in the metrics")
            s = scrape(c)

            def delta(outcome: str, now=s) -> float:
                return value(now, "fairpatch_payload_events_total", outcome=outcome) - \
                    value(before, "fairpatch_payload_events_total", outcome=outcome)

            # 20 events: 4 held by the senders, 1 waiting in the queue of 1, the rest dropped
            assert delta("dropped") == 20 - 4 - 1
            stuck.gate.set()
            until(lambda: delta("sent", scrape(c)) == 5, "the held and queued events delivered")
            assert len(stuck.received) == 5


def test_requests_through_fastapis_stack_are_counted_too(redis_url, tmp_path, upstream):
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, fast_path=False)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        model = f"obs-slow-{RUN}"
        register(c, model, upstream)
        assert c.post(f"/v2/models/{model}/versions/1/infer", json=v2(1)).status_code == 200
        assert c.post(f"/v2/models/{model}/versions/1/infer", content=b"{", headers={
            "content-type": "application/json"}).status_code == 400
        until(lambda: value(scrape(c), "fairpatch_request_seconds_count", model=model, version="1",
                            route="v2_infer") == 2, "both requests in the metrics")
        s = scrape(c)
        for status in ("200", "400"):
            assert value(s, "fairpatch_requests_total", model=model, version="1", patch="", route="v2_infer",
                         status=status) == 1


def test_metrics_off_records_nothing_on_the_hot_path(redis_url, tmp_path, upstream):
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, metrics=False)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        model = f"obs-off-{RUN}"
        register(c, model, upstream)
        assert c.post(f"/v2/models/{model}/versions/1/infer", json=v2(1)).status_code == 200
        s = scrape(c)  # still served: the job gauges and whatever else this process counts
        assert not [k for k in s if ("model", model) in k[1]]
        assert ("fairpatch_job_queue_depth", frozenset()) in s


def test_gateway_processes_share_metrics_in_multiprocess_mode(redis_url, tmp_path, upstream):
    """Two `fairpatch serve` processes with one PROMETHEUS_MULTIPROC_DIR: either one's /metrics counts both."""
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    # readiness here means Redis alone: this module's Redis holds a model whose upstream is down on purpose
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
           "FAIRPATCH_REDIS_URL": redis_url, "FAIRPATCH_DATA_DIR": str(tmp_path / "data"),
           "FAIRPATCH_READY_CHECKS_UPSTREAMS": "false"}
    serve = [sys.executable, "-m", "clients", "serve", "--no-worker", "--port", "0"]  # each binds its own port
    with served(serve, env=env, cwd=REPO, log_path=tmp_path / "a.log", name="gateway a") as a, \
            served(serve, env=env, cwd=REPO, log_path=tmp_path / "b.log", name="gateway b") as b:
        clients = [httpx.Client(base_url=g.url, timeout=30) for g in (a, b)]
        for g in (a, b):
            until(lambda g=g: ready(g.url), "the gateway to be ready")
        model = f"obs-mp-{RUN}"
        register(clients[0], model, upstream)
        for i, c in enumerate(clients):
            for _ in range(i + 2):  # 2 requests to the first, 3 to the second
                assert c.post(f"/v2/models/{model}/versions/1/infer", json=v2(1)).status_code == 200
        for c in clients:
            until(lambda c=c: value(scrape(c), "fairpatch_requests_total", model=model, version="1", patch="",
                                    route="v2_infer", status="200") == 5, "both processes' requests")
            c.close()
