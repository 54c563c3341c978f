"""The gateway's own work on one V2 JSON request, stage by stage, in process: microseconds per request.

    python benchmarks/gateway_parse.py [--batch 64] [--repeat 2000] [--rounds 5]

The request path of `service.infer._serve` for an Adult batch (104 FP32 features per row, plus the BYTES group
input, as benchmarks/gateway_overhead.py sends it) whose patch needs the group, so the features are re-encoded
for the upstream (the JSON leg): each stage is the function the gateway calls, timed on its own, best of
`--rounds` rounds of `--repeat` calls. No HTTP, no patch arithmetic (the Eraser's graphs are the patch's time,
not the gateway's): what is left is parsing, converting and writing JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydantic_core

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.infer import _infer_answer, parse_call  # noqa: E402
from service.oip import RequestOutput, tensor_of, to_numpy  # noqa: E402
from service.registry import ModelSpec, UpstreamSpec  # noqa: E402
from service.upstream import encode_infer, read_v2, scores_array  # noqa: E402


def _bodies(batch: int) -> tuple[ModelSpec, bytes, bytes, np.ndarray]:
    from patcher.datasets import load_dataset

    data = load_dataset("adult", "sex")
    X = np.ascontiguousarray(data.test.X[:batch], np.float32)
    groups = [data.group_names[g] for g in data.test.groups[:batch]]
    inputs = [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()},
              {"name": "group", "shape": [batch], "datatype": "BYTES", "data": groups}]
    request = pydantic_core.to_json({"inputs": inputs})
    logits = np.random.default_rng(0).normal(size=(batch, 2)).astype(np.float32)
    answer = pydantic_core.to_json({"model_name": "adult", "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [batch, 2], "data": logits.ravel().tolist()}]})
    spec = ModelSpec(name="adult", version="1", groups=list(data.group_names),
                     upstream=UpstreamSpec(url="http://127.0.0.1:9", model_name="adult", input_name="input",
                                           output_name="logits"))
    return spec, request, answer, logits


def stages(spec: ModelSpec, request: bytes, answer: bytes) -> dict[str, Any]:
    """name -> a zero-argument callable doing that stage as the gateway does it (inputs prepared once)."""
    call = parse_call("v2", spec, request, None)
    features = call.inputs[0]
    X = to_numpy(features)
    outputs = [RequestOutput(name="logits")]
    result = read_v2(answer, spec.upstream.url)
    scores = scores_array(result.outputs[0], spec.upstream.url)
    served = scores - 0.1  # the patched scores: a new array, so the answer writes them out

    def answer_stage():
        out = tensor_of("logits", served, None)
        return _infer_answer({"model_name": spec.name, "model_version": spec.version, "id": None,
                              "parameters": None}, [out], call.request, None)

    return {
        "parse the request (JSON -> plain objects)": lambda: parse_call("v2", spec, request, None),
        "features to an array": lambda: to_numpy(features),
        "group names to an array": lambda: to_numpy(call.group),
        "encode the upstream request (JSON)": lambda: encode_infer(spec, [features], outputs, None),
        "read the upstream answer": lambda: scores_array(read_v2(answer, spec.upstream.url).outputs[0],
                                                         spec.upstream.url),
        "build the answer": answer_stage,
        "_X": X,
    }


def measure(fns: dict[str, Any], repeat: int, rounds: int) -> dict[str, float]:
    out = {}
    for name, fn in fns.items():
        if name.startswith("_"):
            continue
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(repeat):
                fn()
            best = min(best, (time.perf_counter() - t) / repeat)
        out[name] = best * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    spec, request, answer, _ = _bodies(args.batch)
    figures = measure(stages(spec, request, answer), args.repeat, args.rounds)
    print(f"batch {args.batch}: request {len(request)} bytes, upstream answer {len(answer)} bytes; "
          f"best of {args.rounds} x {args.repeat} calls\n")
    print("| stage | µs per request |\n|---|---|")
    for name, us in figures.items():
        print(f"| {name} | {us:.1f} |")
    print(f"| total | {sum(figures.values()):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
