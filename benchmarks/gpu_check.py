"""CPU vs GPU figures for the `device` setting (docs/gpu.md): one prepared run for a machine with a GPU.

    python benchmarks/gpu_check.py [--quick] [--devices cpu,cuda] [--json out.json]

On the Adult (sex) reference model, criterion dp, the tune split:
1. fit seconds of a gradient trigger (`trigger`, access gradient) and of adversarial fine-tuning, each fitted
   on every device (torch on that device; default options unless --quick);
2. a weight patch served in process: the adversarial fine-tuning patch's replacement model run the way the
   gateway runs it (`PatchRunner.model_logits`, one call per request) on batches of 64 test rows (and 1024):
   rows per second and microseconds per call, with the largest difference from the CPU's logits.

`--devices` defaults to cpu plus cuda where onnxruntime or torch can reach a GPU. Where a runtime cannot run
on a device (e.g. onnxruntime without onnxruntime-gpu) its rows say why instead of a figure. The reference model
is trained on first use and cached under FAIRPATCH_CACHE_DIR (default ~/.cache/fairpatch): point it at a
copied cache to save that time. Prints a markdown table and, with --json, writes every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patcher import device as dev  # noqa: E402

QUICK = {"trigger": {"lam": 1.0, "steps": 40},
         "adversarial_finetune": {"epochs": 1, "critic_steps": 20, "actor_steps": 20}}
BATCHES = (64, 1024)


def _devices(asked: str | None) -> list[str]:
    if asked:
        return [dev.parse_device(d) for d in asked.split(",")]
    try:
        gpu = dev.resolve("auto").get("torch") == "cuda" or dev.resolve("auto", torch=False)["onnxruntime"] == "cuda"
    except Exception:  # a broken install is reported by the cuda rows themselves
        gpu = True
    return ["cpu", "cuda"] if gpu else ["cpu"]


def _fit(method: str, artifact: Any, tune: Any, device: str, options: dict, access: str | None) -> dict[str, Any]:
    from patcher.methods import FitRequest, get_method

    try:
        where = dev.torch_device(device).type
    except dev.DeviceUnavailable as e:
        return {"method": method, "device": device, "error": str(e)}
    started = time.perf_counter()
    result = get_method(method).run(artifact, tune, FitRequest("dp", None, 0, access=access, device=device), options)
    seconds = time.perf_counter() - started
    after = result.report.model_dump().get("tune_after", {})
    return {"method": method, "device": device, "torch_device": where, "fit_seconds": round(seconds, 2),
            "tune_after": after, "patch": result.patch}


def _throughput(patch: Any, X: np.ndarray, device: str, batch: int, calls: int,
                reference: np.ndarray | None) -> dict[str, Any]:
    from patcher.apply import PatchRunner

    try:
        runner = PatchRunner(patch, device)
    except dev.DeviceUnavailable as e:
        return {"device": device, "batch": batch, "error": str(e)}
    rows = [X[(i * batch) % (len(X) - batch):][:batch] for i in range(16)]
    for r in rows:  # warm-up: session arenas, CUDA kernels
        runner.model_logits(r)
    started = time.perf_counter()
    for i in range(calls):
        runner.model_logits(rows[i % len(rows)])
    seconds = time.perf_counter() - started
    out = {"device": device, "onnxruntime_on": runner.model_device, "batch": batch, "calls": calls,
           "rows_per_s": round(calls * batch / seconds), "us_per_call": round(1e6 * seconds / calls, 1)}
    if reference is not None:
        out["max_abs_diff_vs_cpu"] = float(np.max(np.abs(runner.model_logits(X[:1024]) - reference)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny fits and few calls: checks the script, not figures")
    ap.add_argument("--devices", default=None, help="comma-separated: cpu, cuda (default: cpu, plus cuda if any)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)

    import torch

    from patcher.access import ModelArtifact
    from patcher.apply import PatchRunner
    from patcher.datasets import load_dataset
    from patcher.reference_models import reference_model
    from patcher.tuning import TuningData

    devices = _devices(args.devices)
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": torch.get_num_threads(),
           **dev.describe(), "devices": devices, "quick": args.quick}
    print(json.dumps(env), flush=True)
    data = load_dataset("adult", "sex")
    model = reference_model("adult", "sex", seed=0, data=data)
    artifact = ModelArtifact(model.onnx_bytes, name="adult_reference")
    t = data.tune
    tune = TuningData(t.X, t.y, t.groups, data.group_names, tuple(data.feature_names))

    fits: list[dict[str, Any]] = []
    for method, access in (("trigger", "gradient"), ("adversarial_finetune", None)):
        for d in devices:
            r = _fit(method, artifact, tune, d, QUICK[method] if args.quick else {}, access)
            print(f"fit {method} on {d}: " + (f"{r['fit_seconds']} s" if "error" not in r else r["error"]), flush=True)
            fits.append(r)
    patch = next(r["patch"] for r in fits if r["method"] == "adversarial_finetune" and "patch" in r)
    X = np.ascontiguousarray(data.test.X[:20000], np.float32)
    reference = PatchRunner(patch, "cpu").model_logits(X[:1024])
    serving = []
    for batch in BATCHES:
        calls = (200 if args.quick else 5000) if batch == 64 else (50 if args.quick else 1000)
        for d in devices:
            r = _throughput(patch, X, d, batch, calls, reference)
            print(f"serve batch {batch} on {d}: " + (f"{r['rows_per_s']} rows/s, {r['us_per_call']} us/call"
                                                     if "error" not in r else r["error"]), flush=True)
            serving.append(r)

    print("\n| what | " + " | ".join(devices) + " |\n|---|" + "---|" * len(devices))
    for method in ("trigger", "adversarial_finetune"):
        cells = [next((f"{r['fit_seconds']} s" if "fit_seconds" in r else "unavailable")
                      for r in fits if r["method"] == method and r["device"] == d) for d in devices]
        label = "gradient trigger fit" if method == "trigger" else "adversarial fine-tuning fit"
        print(f"| {label} | " + " | ".join(cells) + " |")
    for batch in BATCHES:
        cells = [next((f"{r['rows_per_s']:,} rows/s ({r['us_per_call']} us/call)" if "rows_per_s" in r
                       else "unavailable") for r in serving if r["batch"] == batch and r["device"] == d)
                 for d in devices]
        print(f"| weight patch in process, batch {batch} | " + " | ".join(cells) + " |")
    if args.json:
        for r in fits:
            r.pop("patch", None)
        args.json.write_text(json.dumps({"env": env, "fits": fits, "serving": serving}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
