"""The SDK and the gateway CLI commands against real servers on loopback: the local ONNX upstream
(the Adult reference model) and the gateway with a job worker, each under a real uvicorn.

Redis: REDIS_URL when set (names and the job queue get a per-run suffix), else the embedded one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.sdk import AsyncClient, Client, FairpatchError, ModelSpec, UpstreamSpec
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from service.app import create_app
from service.local_upstream import OnnxModel, create_upstream_app
from service.redis_embedded import redis_url_for
from service.serve_thread import ServerThread
from service.settings import Settings
from service.worker import WorkerThread
from tests.expected import patched_log_probs, patched_scores

REPO = Path(__file__).resolve().parents[1]
KEY = "clients-admin-key"
RUN = uuid.uuid4().hex[:6]
GROUPS = ["Female", "Male"]


def run_onnx(model: bytes, X: np.ndarray) -> np.ndarray:
    """The model's logits, run here with onnxruntime."""
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": X.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def servers(adult_model, tmp_path_factory):
    """(gateway URL, upstream URL), with a job worker on the gateway's Redis."""
    with redis_url_for(os.environ.get("REDIS_URL") or None, tmp_path_factory.mktemp("redis")) as url:
        settings = Settings(data_dir=tmp_path_factory.mktemp("gw"), redis_url=url, admin_key=KEY,
                            job_queue=f"test-clients:{RUN}", log_level="warning")
        with ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name="adult"))) as upstream, \
                ServerThread(create_app(settings)) as gateway, WorkerThread(settings, url):
            yield gateway.url, upstream.url


@pytest.fixture
def fp(servers):
    with Client(servers[0], KEY, timeout=60) as c:
        yield c


def register(fp: Client, upstream: str, name: str, version: str = "1") -> ModelSpec:
    return fp.register_model(ModelSpec(
        name=name, version=version, groups=GROUPS,
        upstream=UpstreamSpec(url=upstream, model_name="adult", input_name="input", output_name="logits")))


def tune_frame(adult, rows: int = 3000) -> pd.DataFrame:
    frame = pd.DataFrame(adult.tune.X[:rows], columns=adult.feature_names)
    frame["income"] = adult.tune.y[:rows]
    frame["sex"] = [adult.group_names[g] for g in adult.tune.groups[:rows]]
    return frame


@pytest.fixture(scope="module")
def trained(servers, adult):
    """A model with a finished Eraser job (group patch): (model name, job, fractions the progress saw)."""
    name = f"adult-{RUN}"
    with Client(servers[0], KEY, timeout=60) as fp:
        register(fp, servers[1], name)
        ds = fp.upload_dataset(tune_frame(adult), label="income", group="sex", name="tune")
        job = fp.create_job(name, ds.id, criterion="dp", query_budget=600, seed=0, options={"bias": "group"})
        assert job.status == "queued" and job.model == name and job.version == "1"
        seen: list[float] = []
        done = fp.wait_job(job.id, progress=lambda j: seen.append(j.progress.fraction), timeout=180)
    return name, done, seen


# --- health, models, errors ------------------------------------------------------------------------

def test_health_and_server_metadata(fp):
    assert fp.live() is True and fp.ready() is True
    assert fp.server_metadata()["name"] == "fairpatch"


def test_models_register_list_get_delete(fp, servers):
    name = f"crud-{RUN}"
    spec = register(fp, servers[1], name, version="2")
    assert (spec.name, spec.version, spec.upstream.url, spec.groups) == (name, "2", servers[1], GROUPS)
    assert register(fp, servers[1], name, version="2").name == name  # the same registration again is fine
    assert (name, "2") in {(m.name, m.version) for m in fp.list_models()}
    assert fp.get_model(name, "2").upstream.output_name == "logits"
    fp.delete_model(name, "2")
    with pytest.raises(FairpatchError) as e:
        fp.get_model(name, "2")
    assert e.value.status == 404 and name in e.value.message


def test_errors_carry_the_server_message(servers):
    with Client(servers[0]) as anonymous, pytest.raises(FairpatchError) as e:
        anonymous.list_models()
    assert e.value.status == 401 and "admin key" in e.value.message
    with Client(servers[0], "wrong") as wrong, pytest.raises(FairpatchError) as e:
        wrong.list_models()
    assert e.value.status == 403 and "wrong" in e.value.message
    with Client(servers[0], KEY) as fp, pytest.raises(FairpatchError) as e:
        fp.register_model({"name": "x", "upstream": {"url": "http://example.com:9000"}})
    assert e.value.status == 403 and "allow-list" in e.value.message
    with Client(servers[0]) as anonymous, pytest.raises(FairpatchError) as e:
        anonymous.infer("no-such-model", np.zeros((1, 3), np.float32), input_name="input")
    assert e.value.status == 404 and "no-such-model" in e.value.message and str(e.value).endswith("(HTTP 404)")


def test_an_unreachable_gateway_is_status_zero():
    with Client("http://127.0.0.1:9", timeout=2) as fp, pytest.raises(FairpatchError) as e:
        fp.live()
    assert e.value.status == 0 and "cannot reach" in e.value.message


# --- data plane --------------------------------------------------------------------------------------

def test_infer_unpatched_is_the_upstream(fp, servers, adult, adult_model):
    name = f"plain-{RUN}"
    register(fp, servers[1], name)
    X = adult.test.X[:50]
    out = fp.infer(name, X, raw=True)  # the input name comes from the model's metadata
    assert out.patch_id is None and out.scores.shape == (50, 2) and out.model_version == "1"
    np.testing.assert_allclose(out.scores, out.raw)
    np.testing.assert_allclose(out.scores, OnnxOracle(adult_model.onnx_bytes).scores(X), rtol=1e-5, atol=1e-5)
    assert (out.predictions == out.scores.argmax(1)).all()
    assert fp.infer(name, X[:3], version="1").raw is None  # no raw scores unless asked
    frame = pd.DataFrame(X.astype(np.float64))  # float64 goes as the model's FP32
    np.testing.assert_allclose(fp.infer(name, frame).scores, out.scores)


# --- datasets ----------------------------------------------------------------------------------------

def test_datasets_from_a_dataframe_a_csv_and_a_parquet_file(fp, adult, tmp_path):
    frame = tune_frame(adult, 400)
    from_frame = fp.upload_dataset(frame, label="income", group="sex", name="frame")
    assert from_frame.rows == 400 and from_frame.groups == GROUPS and from_frame.label == "income"
    csv = tmp_path / "tune.csv"
    frame.to_csv(csv, index=False)
    from_csv = fp.upload_dataset(csv, label="income", group="sex")
    assert from_csv.rows == 400 and from_csv.columns == list(frame.columns)
    pq = tmp_path / "tune.parquet"
    frame.to_parquet(pq, index=False)
    assert fp.upload_dataset(pq, label="income", group="sex").rows == 400
    assert fp.get_dataset(from_csv.id).id == from_csv.id
    fp.delete_dataset(from_csv.id)
    with pytest.raises(FairpatchError) as e:
        fp.get_dataset(from_csv.id)
    assert e.value.status == 404
    with pytest.raises(FairpatchError) as e:
        fp.upload_dataset(frame, label="income", group="no_such_column")
    assert e.value.status == 400 and "no_such_column" in e.value.message


# --- jobs and patches --------------------------------------------------------------------------------

def test_a_job_trains_a_patch_within_its_budget(trained):
    _, job, seen = trained
    assert job.status == "succeeded", job.error
    assert seen and seen == sorted(seen) and job.progress.fraction == 1.0
    r = job.result
    assert r.patch_id and 0 < r.queries_used <= 600 and r.eval_queries > 0
    assert r.after["dp_diff"] < r.before["dp_diff"]


def test_jobs_list_and_cancel_a_finished_one(fp, trained):
    _, job, _ = trained
    assert job.id in {j.id for j in fp.list_jobs()}
    assert fp.get_job(job.id).status == "succeeded"
    with pytest.raises(FairpatchError) as e:
        fp.cancel_job(job.id)
    assert e.value.status == 409 and "succeeded" in e.value.message
    with pytest.raises(FairpatchError) as e:
        fp.cancel_job("no-such-job")
    assert e.value.status == 404


def test_activate_infer_download_upload_deactivate(fp, servers, trained, adult, adult_model):
    name, job, _ = trained
    pid = job.result.patch_id
    listing = fp.list_patches(name)
    assert listing.active is None and [p.id for p in listing.patches] == [pid]
    assert listing.patches[0].group_at_inference is True and listing.patches[0].method == "eraser"
    fp.activate_patch(name, pid)
    assert fp.list_patches(name).active == pid
    assert fp.model_metadata(name)["parameters"]["fairpatch_patch"] == pid

    X, g = adult.test.X[:200], adult.test.groups[:200]
    names = [GROUPS[i] for i in g]
    out = fp.infer(name, X, names, raw=True)
    assert out.patch_id == pid
    patch = Patch.from_bytes(fp.download_patch(pid), expected_id=pid)  # applied here from its own graph
    logits = run_onnx(adult_model.onnx_bytes, X)
    np.testing.assert_array_equal(out.predictions, patched_log_probs(patch, X, logits, g).argmax(1))
    np.testing.assert_allclose(out.raw, logits, rtol=1e-5, atol=1e-5)
    assert (out.predictions != out.raw.argmax(1)).any()  # the patch changes some decisions
    assert (fp.infer(name, X, g).predictions == out.predictions).all()  # int64 group ids work too

    with pytest.raises(FairpatchError) as e:
        fp.infer(name, X[:2])
    assert e.value.status == 400 and "group" in e.value.message
    with pytest.raises(FairpatchError) as e:
        fp.infer(name, X[:2], ["Female", "Martian"])
    assert e.value.status == 400 and "Martian" in e.value.message

    # the patch travels: download it, upload it for another version (a fresh registration)
    register(fp, servers[1], f"copy-{RUN}")
    data = fp.download_patch(pid)
    with pytest.raises(FairpatchError) as e:  # bound to its model version: refused elsewhere
        fp.upload_patch(f"copy-{RUN}", data)
    assert e.value.status == 409
    unbound = Patch.from_bytes(data)
    unbound = Patch({**unbound.manifest, "model": {}}, dict(unbound.blobs))
    copied = fp.upload_patch(f"copy-{RUN}", unbound.to_bytes())
    assert copied != pid and [p.id for p in fp.list_patches(f"copy-{RUN}").patches] == [copied]

    fp.deactivate_patch(name)
    assert fp.list_patches(name).active is None
    assert fp.infer(name, X[:5]).patch_id is None


def test_async_client(servers, adult):
    async def main() -> None:
        async with AsyncClient(servers[0], KEY) as fp:
            name = f"async-{RUN}"
            await fp.register_model(ModelSpec(name=name, upstream=UpstreamSpec(url=servers[1], model_name="adult")))
            assert name in {m.name for m in await fp.list_models()}
            outs = await asyncio.gather(*(fp.infer(name, adult.test.X[i:i + 8]) for i in range(0, 64, 8)))
            assert all(o.scores.shape == (8, 2) and o.patch_id is None for o in outs)
            assert await fp.ready()
            try:
                await fp.get_job("no-such-job")
            except FairpatchError as e:
                assert e.status == 404
            else:
                raise AssertionError("expected a 404")

    asyncio.run(main())


# --- the CLI, as a user runs it ------------------------------------------------------------------------

def cli(*args: str, url: str, key: str | None = KEY, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAIRPATCH_URL": url}
    env.pop("FAIRPATCH_ADMIN_KEY", None)
    if key:
        env["FAIRPATCH_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "clients", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_register_upload_train_activate_infer(servers, fp, adult, adult_model, tmp_path):
    gw, up = servers
    name = f"cli-{RUN}"
    # --binary-data: the job's queries and the inference below reach the upstream as binary tensor data
    p = cli("models", "register", name, "--upstream-url", up, "--upstream-model", "adult", "--groups",
            "Female,Male", "--binary-data", url=gw)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["name"] == name and json.loads(p.stdout)["upstream"]["binary_data"] is True
    p = cli("models", "list", "--json", url=gw)
    assert p.returncode == 0 and name in {m["name"] for m in json.loads(p.stdout)}

    csv = tmp_path / "tune.csv"
    tune_frame(adult, 2000).to_csv(csv, index=False)
    gz = tmp_path / "tune.csv.gz"  # gzip, as a user keeps it; one line back, not every column
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    p = cli("datasets", "upload", str(gz), "--label", "income", "--group", "sex", url=gw)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 and "2,000 rows" in p.stdout and "group sex: Female" in p.stdout, p.stdout
    dataset = p.stdout.split()[1].rstrip(":")

    p = cli("jobs", "create", "--model", name, "--dataset", dataset, "--queries", "400", "-o", "bias=estimator",
            "--wait", url=gw)
    assert p.returncode == 0, p.stderr
    assert "succeeded" in p.stdout and "dp_diff" in p.stdout
    pid = p.stdout.split("patch ", 1)[1].split()[0]
    assert cli("patches", "activate", name, pid, url=gw).returncode == 0
    p = cli("patches", "list", name, "--json", url=gw)
    assert json.loads(p.stdout)["active"] == pid

    test = pd.DataFrame(adult.test.X[:20], columns=adult.feature_names)
    test["income"] = adult.test.y[:20]
    test_csv = tmp_path / "test.csv"
    test.to_csv(test_csv, index=False)
    p = cli("infer", name, str(test_csv), "--drop", "income", "--raw", "--batch", "8", url=gw, key=None)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "row,prediction,score_0,score_1,raw_0,raw_1" and len(lines) == 21
    assert pid in p.stderr
    # the values: the model's logits and the patch applied to them from its own graph, here
    printed = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    X = adult.test.X[:20].astype(np.float32)
    logits = run_onnx(adult_model.onnx_bytes, X)
    patched = patched_scores(Patch.from_bytes(fp.download_patch(pid), expected_id=pid), X, logits)
    np.testing.assert_array_equal(printed[:, 0], np.arange(20))
    np.testing.assert_array_equal(printed[:, 1], patched.argmax(1))
    np.testing.assert_allclose(printed[:, 2:4], patched, rtol=1e-5, atol=1e-5)  # printed to 6 significant digits
    np.testing.assert_allclose(printed[:, 4:6], logits, rtol=1e-5, atol=1e-5)

    out = tmp_path / "patch.fpatch"
    p = cli("patches", "download", pid, "-o", str(out), url=gw)
    assert p.returncode == 0 and Patch.load(out, expected_id=pid).id == pid


def test_cli_errors_print_the_server_message_and_exit_nonzero(servers):
    gw, _ = servers
    p = cli("models", "get", "no-such-model", url=gw)
    assert p.returncode == 1 and "unknown model 'no-such-model'" in p.stderr and "(HTTP 404)" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("models", "list", url=gw, key=None)
    assert p.returncode == 1 and "admin key" in p.stderr and "Traceback" not in p.stderr
    p = cli("jobs", "list", "--admin-key", "wrong", url=gw, key=None)  # the flag after the subcommand
    assert p.returncode == 1 and "(HTTP 403)" in p.stderr
    p = cli("--url", "http://127.0.0.1:9", "models", "list", url=gw)  # the flag before it
    assert p.returncode == 1 and "cannot reach the gateway at http://127.0.0.1:9" in p.stderr
    p = cli("datasets", "upload", "/no/such/file.csv", "--label", "y", "--group", "g", url=gw)
    assert p.returncode == 1 and "No such file" in p.stderr and "Traceback" not in p.stderr


def test_demo_runs_the_whole_loop_through_the_gateway(tmp_path):
    report = tmp_path / "demo.html"
    p = subprocess.run([sys.executable, "-m", "clients", "demo", "--queries", "400", "--report", str(report)],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "COLUMNS": "160"})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "Eraser job" in out and "activated it" in out and "not needed at inference" in out
    rows = {line.split("│")[1].strip(): line.split("│")[2:5] for line in out.splitlines() if line.count("│") >= 5}
    before, after = (float(rows["dp_diff"][i]) for i in (0, 1))
    assert after < before / 2  # the patch served by the gateway removes most of the dp gap
    assert {"selection rate (Female)", "selection rate (Male)", "accuracy", "eo_diff"} <= set(rows)
    assert "Traceback" not in p.stderr
    # it ends with the path of the job's report, written there
    assert out.strip().splitlines()[-1] == f"the job's report (open it in a browser): {report}"
    assert "<h2>By group</h2>" in report.read_text()


# --- model artifacts and weight patches ----------------------------------------------------------------

def test_sdk_artifact_upload_download_and_a_weight_patch(fp, servers, adult, adult_model):
    import hashlib

    from patcher.onnx_graphs import mlp_model

    name = f"art-{RUN}"
    register(fp, servers[1], name)
    info = fp.upload_artifact(name, adult_model.onnx_bytes)
    assert info.sha256 == hashlib.sha256(adult_model.onnx_bytes).hexdigest() and info.opset == 17
    assert fp.get_artifact(name).sha256 == info.sha256 and fp.get_model(name).artifact.sha256 == info.sha256
    assert fp.download_artifact(name) == adult_model.onnx_bytes
    with pytest.raises(FairpatchError) as e:
        fp.upload_artifact(name, b"not onnx")
    assert e.value.status == 400 and "not an ONNX model" in e.value.message

    rng = np.random.default_rng(0)
    d = adult.test.X.shape[1]
    replacement = mlp_model([(rng.normal(size=(d, 4)), rng.normal(size=4)), (rng.normal(size=(4, 2)), np.zeros(2))])
    patch = Patch.build(method="weights-test", n_classes=2, replacement_model=replacement)
    pid = fp.upload_patch(name, patch.to_bytes())
    fp.activate_patch(name, pid)
    X = adult.test.X[:10]
    out = fp.infer(name, X, request_id="r-1")
    assert out.served_by == "patch" and out.patch_id == pid
    np.testing.assert_array_equal(out.predictions, run_onnx(replacement, X).argmax(1))  # the replacement, run here
    fp.deactivate_patch(name)
    assert fp.infer(name, X).served_by == "upstream"

    with pytest.raises(FairpatchError) as e:  # eraser works through queries only
        fp.create_job(name, "0" * 32, access="gradient")
    assert e.value.status == 400 and "supports: queries" in e.value.message

    # a FORML job on the artifact, with an exemplar set; its sample audit condenses the dataset
    train = fp.upload_dataset(tune_frame(adult, 1200), label="income", group="sex")
    exemplars = fp.upload_dataset(tune_frame(adult, 1600).iloc[1200:], label="income", group="sex")
    job = fp.create_job(name, train.id, method="forml", criterion="eopp", query_budget=None, access="weights",
                        exemplar_dataset=exemplars.id, options={"epochs": 1, "exemplar_batch": 64, "min_per_cell": 4})
    assert job.access == "weights" and job.exemplar_dataset == exemplars.id
    done = fp.wait_job(job.id, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.result.served_by == "patch" and done.result.access == "weights"
    condensed = fp.condensed_dataset(job.id)
    assert condensed.rows == 1200 - round(0.1 * done.result.report["n_train"])
    fp.delete_artifact(name)
    with pytest.raises(FairpatchError) as e:
        fp.get_artifact(name)
    assert e.value.status == 404


def test_cli_model_artifact_commands(servers, adult_model, tmp_path):
    gw, up = servers
    name = f"cli-art-{RUN}"
    assert cli("models", "register", name, "--upstream-url", up, "--upstream-model", "adult", url=gw).returncode == 0
    model = tmp_path / "model.onnx"
    model.write_bytes(adult_model.onnx_bytes)
    p = cli("models", "artifact", "upload", name, "1", str(model), url=gw)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["opset"] == 17
    out = tmp_path / "back.onnx"
    p = cli("models", "artifact", "download", name, "1", "-o", str(out), url=gw)
    assert p.returncode == 0 and out.read_bytes() == adult_model.onnx_bytes
    p = cli("jobs", "create", "--model", name, "--dataset", "0" * 32, "--access", "weights", url=gw)
    assert p.returncode != 0 and "does not support access 'weights'" in p.stderr
