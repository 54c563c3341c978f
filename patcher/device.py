"""Where models run: one `device` setting, `auto`, `cpu` or `cuda`, for onnxruntime sessions and torch fits.

- `cpu`: onnxruntime's CPU provider, torch on the CPU.
- `cuda`: onnxruntime's CUDA provider (CPU kept behind it for the operators CUDA lacks), torch on
  `cuda`; where either is missing, a `DeviceUnavailable` error that says what to install.
- `auto`: `cuda` where it is there (onnxruntime: the CUDA provider is built in and starts; torch:
  `torch.cuda.is_available()`), else `cpu`. Each runtime decides for itself: an onnxruntime-gpu
  install beside a CPU torch serves on the GPU and trains on the CPU.

The default is the environment's `FAIRPATCH_DEVICE`, else `auto`. Callers pass `device=` to override it
(the service passes its `Settings.device`, which reads the same variable).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
ENV = "FAIRPATCH_DEVICE"
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"

ORT_HINT = ("install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA GPU and driver: "
            "`pip uninstall -y onnxruntime`, then the `gpu` extra's packages (docs/gpu.md), or use the worker-gpu "
            "image; or set device=auto / cpu")
TORCH_HINT = ("install a CUDA build of torch (pip install torch==<the torch extra's pin> from the PyTorch CUDA index "
              "or PyPI's default Linux wheel; docs/gpu.md) on a machine with an NVIDIA GPU and driver; or set "
              "device=auto / cpu")

log = logging.getLogger("fairpatch.device")
_warned: set[str] = set()


class DeviceUnavailable(RuntimeError):
    """`cuda` was asked for and this process cannot run there."""


def parse_device(value: str | None = None) -> Device:
    """A device name checked (case and spaces forgiven); None: FAIRPATCH_DEVICE, else `auto`."""
    raw = os.environ.get(ENV, "auto") if value is None else value
    name = raw.strip().lower() or "auto"
    if name not in DEVICES:
        raise ValueError(f"unknown device {raw!r}; choose one of {', '.join(DEVICES)}")
    return name  # type: ignore[return-value]


# ---------------------------------------------------------------- onnxruntime


def ort_cuda_built() -> bool:
    """The installed onnxruntime has the CUDA provider (onnxruntime-gpu); says nothing of a GPU being there."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


def ort_providers(device: str | None = None) -> list[str]:
    """The providers a session for `device` asks for; `cuda` without the CUDA provider refuses."""
    dev = parse_device(device)
    if dev == "cpu" or (dev == "auto" and not ort_cuda_built()):
        return [CPU_PROVIDER]
    if not ort_cuda_built():
        import onnxruntime as ort

        raise DeviceUnavailable(f"device 'cuda' asked for, but onnxruntime {ort.__version__} has no CUDA provider "
                                f"(providers: {', '.join(ort.get_available_providers())}): {ORT_HINT}")
    return [CUDA_PROVIDER, CPU_PROVIDER]


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu's `cuda`/`cudnn` extras install the CUDA libraries as pip packages, off the loader's path:
    preload_dlls (onnxruntime >= 1.21) loads them (or torch's, when torch is imported first)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # the libraries may be on the system path instead: the session tells
            log.debug("onnxruntime.preload_dlls failed: %s", e)


def ort_session(model: str | bytes, options: Any = None, device: str | None = None) -> Any:
    """An InferenceSession on `device`. `cuda` refuses when the CUDA provider did not start (no GPU, driver or
    CUDA libraries); `auto` then runs on the CPU and logs why once."""
    import onnxruntime as ort

    dev = parse_device(device)
    providers = ort_providers(dev)
    if providers[0] != CUDA_PROVIDER:
        return ort.InferenceSession(model, options, providers=providers)
    _preload_cuda_libraries()
    try:
        session = ort.InferenceSession(model, options, providers=providers)
        reason = None if CUDA_PROVIDER in session.get_providers() else \
            "the CUDA provider did not start (see onnxruntime's log above: GPU, driver or CUDA libraries)"
    except Exception as e:  # a CUDA provider that fails to load: the model itself is checked on the CPU below
        session, reason = None, f"the CUDA provider failed: {str(e).splitlines()[0][:300]}"
    if reason is None:
        return session
    if dev == "cuda":
        raise DeviceUnavailable(f"device 'cuda' asked for, but {reason}: {ORT_HINT}")
    if "ort" not in _warned:
        _warned.add("ort")
        log.warning("device auto: onnxruntime runs on the CPU because %s", reason)
    return session or ort.InferenceSession(model, options, providers=[CPU_PROVIDER])


def session_device(session: Any) -> str:
    """Where a session runs: `cuda` or `cpu` (its first provider)."""
    return "cuda" if session.get_providers()[0] == CUDA_PROVIDER else "cpu"


# ---------------------------------------------------------------- torch


def torch_device(device: str | None = None) -> torch.device:
    """The torch device for `device`; `cuda` without a usable CUDA torch refuses."""
    import torch

    dev = parse_device(device)
    if dev == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if dev == "auto":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise DeviceUnavailable(f"device 'cuda' asked for, but torch {torch.__version__} is a CPU build: {TORCH_HINT}")
    raise DeviceUnavailable(f"device 'cuda' asked for, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                            f"no GPU: run on a machine with an NVIDIA GPU and a driver for CUDA {torch.version.cuda} "
                            "(nvidia-smi shows both), or CUDA_VISIBLE_DEVICES hides them; or set device=auto / cpu")


def _probe_model() -> bytes:
    """A one-node ONNX graph (Identity on a float vector): enough to see where a session lands."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "device_probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def resolve(device: str | None = None, *, torch: bool | None = None) -> dict[str, str]:
    """Where onnxruntime (and torch: True, False, or None = when installed) run under `device`, found by starting
    them: a process checks this at start so that `cuda` fails there, not on its first request or job."""
    import importlib.util

    where = {"onnxruntime": session_device(ort_session(_probe_model(), None, device))}
    if torch or (torch is None and importlib.util.find_spec("torch") is not None):
        where["torch"] = torch_device(device).type
    return where


def describe() -> dict[str, Any]:
    """What each runtime would use under `auto`, for logs and benchmarks (imports onnxruntime and, if
    installed, torch)."""
    import onnxruntime as ort

    out: dict[str, Any] = {"onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers()}
    try:
        import torch
    except ImportError:
        out["torch"] = None
        return out
    out.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda, torch_cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
