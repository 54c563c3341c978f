"""The `device` setting (patcher.device): parsing, what `auto` and `cuda` resolve to, the providers every
onnxruntime session gets (the local upstream, weight patches served in process, oracles), torch fits on the
device. Runs on the CPU; the CUDA cases skip with the reason where this machine has no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from patcher import device as dev
from patcher.access import ModelArtifact
from patcher.apply import PatchRunner
from patcher.methods import FitRequest, get_method
from patcher.oracle import OnnxOracle
from patcher.patch import Patch
from patcher.tuning import TuningData
from service.local_upstream import OnnxModel
from service.settings import Settings
from tests.conftest import random_mlp

ORT_CUDA_BUILT = dev.CUDA_PROVIDER in ort.get_available_providers()
ORT_CUDA = dev.resolve("auto", torch=False)["onnxruntime"] == "cuda"  # built in and it starts
TORCH_CUDA = torch.cuda.is_available()
NO_ORT_GPU = "no GPU for onnxruntime here: " + (
    "its CUDA provider does not start" if ORT_CUDA_BUILT else
    "no CUDA provider (onnxruntime-gpu, the `gpu` extra, is not installed)")
NO_TORCH_GPU = "no GPU for torch here: torch.cuda.is_available() is False"
CPU = [dev.CPU_PROVIDER]


@pytest.fixture(autouse=True)
def _no_env_device(monkeypatch):
    monkeypatch.delenv(dev.ENV, raising=False)


@pytest.fixture(scope="module")
def model() -> bytes:
    return random_mlp(5)


@pytest.fixture(scope="module")
def data() -> TuningData:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5)).astype(np.float32)
    groups = (X[:, 0] > 0).astype(np.int64)
    y = ((X[:, 1] + 0.8 * groups + rng.normal(scale=0.5, size=400)) > 0.4).astype(np.int64)
    return TuningData(X, y, groups, ("a", "b"), tuple(f"x{i}" for i in range(5)))


# ---------------------------------------------------------------- the setting


def test_device_names_parse(monkeypatch):
    assert [dev.parse_device(v) for v in ("auto", "CPU", " cuda ", "")] == ["auto", "cpu", "cuda", "auto"]
    assert dev.parse_device() == "auto"  # no FAIRPATCH_DEVICE
    monkeypatch.setenv(dev.ENV, "cpu")
    assert dev.parse_device() == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'; choose one of auto, cpu, cuda"):
        dev.parse_device("gpu0")


def test_settings_device(monkeypatch):
    assert Settings().device == "auto"
    monkeypatch.setenv("FAIRPATCH_DEVICE", " CUDA ")
    assert Settings().device == "cuda"
    monkeypatch.setenv("FAIRPATCH_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


# ---------------------------------------------------------------- auto and cuda here


@pytest.mark.skipif(ORT_CUDA, reason="onnxruntime reaches a GPU: auto picks it")
def test_auto_is_cpu_for_onnxruntime_without_a_gpu():
    assert dev.ort_providers("auto") == (CPU if not ORT_CUDA_BUILT else [dev.CUDA_PROVIDER, dev.CPU_PROVIDER])
    assert dev.resolve("auto", torch=False) == {"onnxruntime": "cpu"}


@pytest.mark.skipif(TORCH_CUDA, reason="torch sees a GPU: auto picks it")
def test_auto_is_cpu_for_torch_without_a_gpu():
    assert dev.torch_device("auto").type == "cpu"
    assert dev.torch_device("cpu").type == "cpu"


@pytest.mark.skipif(ORT_CUDA, reason="onnxruntime reaches a GPU: cuda does not refuse")
def test_cuda_refuses_for_onnxruntime_saying_what_to_install(model):
    if not ORT_CUDA_BUILT:
        with pytest.raises(dev.DeviceUnavailable, match=r"has no CUDA provider .*install onnxruntime-gpu .*gpu. extra"):
            dev.ort_providers("cuda")
    with pytest.raises(dev.DeviceUnavailable, match="onnxruntime-gpu"):
        OnnxModel(model, name="m", device="cuda")
    with pytest.raises(dev.DeviceUnavailable):
        OnnxOracle(model, device="cuda")


@pytest.mark.skipif(TORCH_CUDA, reason="torch sees a GPU: cuda does not refuse")
def test_cuda_refuses_for_torch_saying_what_to_install():
    says = "install a CUDA build of torch" if torch.version.cuda is None else "sees no GPU: run on a machine with"
    with pytest.raises(dev.DeviceUnavailable, match=f"device 'cuda' asked for, but torch .*{says}"):
        dev.torch_device("cuda")


def test_cpu_never_asks_for_cuda():
    assert dev.ort_providers("cpu") == CPU
    assert dev.resolve("cpu") == {"onnxruntime": "cpu", "torch": "cpu"}


# ---------------------------------------------------------------- the sessions get what the setting says


def test_local_upstream_session_providers(model, monkeypatch):
    up = OnnxModel(model, name="m", device="cpu")
    assert up.session.get_providers() == CPU and up.device == "cpu"
    monkeypatch.setenv(dev.ENV, "cpu")  # no device argument: the environment's
    assert OnnxModel(model, name="m").session.get_providers() == CPU


def _weight_patch(model: bytes) -> Patch:
    return Patch.build(method="test", n_classes=2, groups=["a", "b"], group_at_inference=False,
                       replacement_model=model)


def test_weight_patch_runs_where_the_setting_says(model):
    runner = PatchRunner(_weight_patch(model), "cpu")
    assert runner.model_device == "cpu" and runner._model.get_providers() == CPU
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    expected = ort.InferenceSession(model, providers=CPU).run(None, {"input": X})[0]
    np.testing.assert_array_equal(runner.model_logits(X), expected)


def test_oracle_session_providers(model):
    assert OnnxOracle(model, device="cpu")._session.get_providers() == CPU
    assert ModelArtifact(model).oracle(device="cpu")._session.get_providers() == CPU


@pytest.mark.skipif(not ORT_CUDA, reason=NO_ORT_GPU)
def test_cuda_sessions_on_the_gpu(model):
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    up = OnnxModel(model, name="m", device="cuda")
    assert up.session.get_providers()[0] == dev.CUDA_PROVIDER
    runner = PatchRunner(_weight_patch(model), "cuda")
    assert runner.model_device == "cuda"
    np.testing.assert_allclose(runner.model_logits(X), PatchRunner(_weight_patch(model), "cpu").model_logits(X),
                               rtol=1e-4, atol=1e-5)
    assert OnnxOracle(model, device="auto")._session.get_providers()[0] == dev.CUDA_PROVIDER


# ---------------------------------------------------------------- torch fits

ADVERSARIAL = {"epochs": 1, "critic_steps": 5, "actor_steps": 5, "holdout": 0.0, "bootstrap": 0}
TRIGGER = {"lam": 1.0, "steps": 10, "batch_size": 64, "holdout": 0.3}


def _fit(method: str, model: bytes, data: TuningData, device: str | None, options: dict, access: str | None = None):
    request = FitRequest("dp", None, 0, access=access, device=device)
    return get_method(method).run(ModelArtifact(model), data, request, options)


@pytest.mark.parametrize("method,options,access", [("adversarial_finetune", ADVERSARIAL, None),
                                                   ("trigger", TRIGGER, "gradient")])
def test_torch_fit_on_cpu(model, data, method, options, access):
    on_cpu = _fit(method, model, data, "cpu", options, access)
    assert on_cpu.patch.method == method
    if not TORCH_CUDA:  # the default (auto, no GPU here) is the CPU: the same fit, the same patch
        assert _fit(method, model, data, None, options, access).patch.id == on_cpu.patch.id


@pytest.mark.skipif(TORCH_CUDA, reason="torch sees a GPU: cuda does not refuse")
def test_torch_fit_on_cuda_refuses_here(model, data):
    with pytest.raises(dev.DeviceUnavailable, match="device 'cuda' asked for, but torch"):
        _fit("adversarial_finetune", model, data, "cuda", ADVERSARIAL)


@pytest.mark.skipif(not TORCH_CUDA, reason=NO_TORCH_GPU)
@pytest.mark.parametrize("method,options,access", [("adversarial_finetune", ADVERSARIAL, None),
                                                   ("trigger", TRIGGER, "gradient"),
                                                   ("random_perturbation", {"trials": 2}, None),
                                                   ("forml", {"epochs": 1}, None)])
def test_torch_fit_on_cuda(model, data, method, options, access):
    result = _fit(method, model, data, "cuda", options, access)
    assert result.patch.method == method


# ---------------------------------------------------------------- start-up checks


@pytest.mark.skipif(ORT_CUDA, reason="onnxruntime reaches a GPU: cuda does not refuse")
def test_commands_refuse_cuda_at_start(capsys):
    from service.commands import _device_ok

    assert _device_ok("serve", "cuda", torch=False) is False
    assert "fairpatch serve: device 'cuda' asked for" in capsys.readouterr().err
    assert _device_ok("worker", "cpu", torch=None) is True


@pytest.mark.skipif(ORT_CUDA, reason="onnxruntime reaches a GPU: cuda does not refuse")
def test_fairpatch_upstream_with_cuda_says_why_and_exits_2(tmp_path, model):
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    env = {**os.environ, "FAIRPATCH_DEVICE": "cpu"}  # the flag wins over the environment
    p = subprocess.run([sys.executable, "-m", "clients", "upstream", "--onnx", str(path), "--name", "m",
                        "--device", "cuda", "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    assert "device 'cuda' asked for" in p.stderr and "Traceback" not in p.stderr


def test_gpu_check_runs_on_the_cpu(tmp_path, adult_model, capsys):
    """benchmarks/gpu_check.py, the prepared script for a GPU machine, runs here in its quick mode (no figures
    are asserted: timing lives in benchmarks)."""
    from benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--quick", "--devices", "cpu,cuda", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert {(f["method"], f["device"]) for f in figures["fits"]} == {
        (m, d) for m in ("trigger", "adversarial_finetune") for d in ("cpu", "cuda")}
    cpu = [s for s in figures["serving"] if s["device"] == "cpu"]
    assert [s["batch"] for s in cpu] == [64, 1024] and all(s["rows_per_s"] > 0 for s in cpu)
    if not TORCH_CUDA:
        assert all("error" in f for f in figures["fits"] if f["device"] == "cuda")
    assert "| weight patch in process, batch 64 |" in capsys.readouterr().out
