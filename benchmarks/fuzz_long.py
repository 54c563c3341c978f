"""A long fuzz run against a gateway served for real on loopback: schemathesis over the whole OpenAPI
document, then hypothesis-generated tensors through KServe V1 and Open Inference Protocol V2.

    python benchmarks/fuzz_long.py [--cases 50000] [--tensor-cases N] [--seed 0]

The bounded versions run in `make test` (tests/test_fuzz_openapi.py, tests/test_fuzz_tensors.py); this one
sends the same kinds of cases, as many as asked for, seeded (another seed, other cases). `--cases` is spread
evenly over the document's operations (an operation with few distinct cases, such as a GET without
parameters, sends fewer: hypothesis stops when it has tried them all); `--tensor-cases` (default a quarter
of `--cases`) is split between the V1/V2 agreement check and arbitrary V2 bodies. The world, checks and
findings are the tests' own (tests/openapi_fuzz.py): no 5xx, no request without an answer, every error JSON
with `error`, V1 and V2 alike on the same tensor problem, and the patched prediction still served at the
end. Prints cases, operations, server errors and findings; exits 1 when there is a finding.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher.datasets import load_dataset  # noqa: E402
from patcher.reference_models import reference_model  # noqa: E402
from service.redis_embedded import redis_url_for  # noqa: E402
from tests.openapi_fuzz import Tally, assert_patched_prediction, fuzz, fuzz_world  # noqa: E402
from tests.test_fuzz_tensors import _v1_and_v2_agree, _v2_bodies, tensors, v2_bodies  # noqa: E402


def _tallied(label: str, inner, gw, tally: Tally):
    def run(case) -> None:
        tally.cases += 1
        try:
            inner(gw, case)
        except AssertionError as e:
            tally.findings.append(f"{label}: {str(e)[:600]}")

    return run


def fuzz_tensors(world, cases: int, seed_: int, tally: Tally) -> None:
    """The tensor tests' own checks (their undecorated bodies), each failure tallied as a finding."""
    with httpx.Client(base_url=world.url, timeout=60) as client:
        gw = SimpleNamespace(client=client, name=world.model)
        for label, body, strategy in (("tensors V1/V2", _v1_and_v2_agree, tensors()),
                                      ("V2 bodies", _v2_bodies, v2_bodies())):
            run = _tallied(label, body.hypothesis.inner_test, gw, tally)
            tally.operations.add(label)
            config = settings(max_examples=max(1, cases // 2), derandomize=False, database=None, deadline=None,
                              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            seed(seed_)(config(given(case=strategy)(run)))()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=50_000, help="OpenAPI cases, spread over the operations")
    parser.add_argument("--tensor-cases", type=int, default=None, help="tensor cases (default: cases / 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tensor_cases = args.cases // 4 if args.tensor_cases is None else args.tensor_cases

    adult = load_dataset("adult", "sex")
    model = reference_model("adult", "sex", seed=0, data=adult)
    tmp = Path(tempfile.mkdtemp(prefix="fp-fuzz-"))
    with redis_url_for(None, tmp / "redis") as redis_url, fuzz_world(adult, model, redis_url, tmp / "gw") as world:
        assert_patched_prediction(world)
        operations = sum(len(methods) for methods in httpx.get(f"{world.url}/openapi.json").json()["paths"].values())
        started = time.monotonic()
        openapi = fuzz(world, max(1, math.ceil(args.cases / operations)), seed_=args.seed,
                       progress=lambda label, t: print(f"  {label}: {t.cases} cases so far, "
                                                       f"{len(t.findings)} findings", flush=True))
        openapi_s = time.monotonic() - started
        print(f"OpenAPI: {openapi.summary()} in {openapi_s:.0f} s", flush=True)
        started = time.monotonic()
        tensors_ = Tally()
        if tensor_cases:
            fuzz_tensors(world, tensor_cases, args.seed, tensors_)
        tensors_s = time.monotonic() - started
        print(f"tensors: {tensors_.cases} cases ({', '.join(sorted(tensors_.operations))}); "
              f"findings: {len(tensors_.findings)} in {tensors_s:.0f} s", flush=True)
        assert_patched_prediction(world)
        print("the patched prediction is still served")
    findings = openapi.findings + tensors_.findings
    print(f"total: {openapi.cases + tensors_.cases} cases, {len(openapi.operations)} operations + "
          f"{len(tensors_.operations)} tensor checks, server errors: {openapi.server_errors}, "
          f"findings: {len(findings)}, {openapi_s + tensors_s:.0f} s")
    for f in findings[:50]:
        print(" -", f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
