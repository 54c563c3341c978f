"""A pass-through proxy on the gateway's own stack, the floor under the gateway's overhead.

    python benchmarks/bare_proxy.py --upstream http://127.0.0.1:9000 --port 9100 [--patch PATCH]

uvicorn (httptools, uvloop when installed, no access log) in front of one pooled aiohttp client, as in
`fairpatch serve`: every POST is read whole and sent to the same path on the upstream, and the answer's
status, content type and body come back unchanged. No parsing, no patch, no Redis: what any Python proxy
built from these parts adds to a request on this machine. `benchmarks/gateway_overhead.py --floor`
measures it in the same rounds as the gateway.

With --patch, the patched floor (`PatchedFloor`): the least a Python gateway must do to serve a patch with no group
at inference on a JSON leg, on the same stack; `gateway_overhead.py --targets patched-floor` measures it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patcher.apply import PatchRunner
from patcher.patch import Patch
from patcher.scores import from_log_probs, to_log_probs
from service.oip import SIMD_MIN_BYTES, simdjson


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = await read_body(receive)
        await _send(send, *await self._forward(scope["method"], scope["path"], body))

    async def _forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        """The upstream's status, body and content type for the request, as they are."""
        try:
            return await self._exchange(method, path, body)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # one retry of a reused keep-alive connection the upstream closed, as the gateway
            return await self._exchange(method, path, body)

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        async with self.session.request(method, self.upstream + path, data=body,
                                        headers={"content-type": "application/json"}) as response:
            kind = response.headers.get("content-type", "application/json")
            return response.status, await response.read(), kind.encode("latin-1")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class PatchedFloor(BareProxy):
    """The least a Python gateway must do to serve a patch that needs no group at inference (the Eraser with its
    attribute estimator, say) on a JSON leg: parse the request's one tensor into an array, send the caller's bytes
    on unchanged, parse the upstream's first output as the scores (logits), run the patch's output transform (the
    same PatchRunner the gateway runs) and write the V2 answer. Nothing is checked (shapes, datatypes, the model's
    signature), nothing observed (metrics, live fairness), no failure answered: the floor under any gateway that
    applies this patch, against which the gateway's checks and features are measured."""

    def __init__(self, upstream: str, runner: PatchRunner) -> None:
        super().__init__(upstream)
        if runner.needs_group or runner.replaces_model:
            raise ValueError("the patched floor serves output-transform patches that need no group at inference")
        self.runner = runner
        self._parser = simdjson.Parser() if simdjson is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await super().__call__(scope, receive, send)  # lifespan, readiness and metadata pass through
            return
        body = await read_body(receive)
        X = self._features(body)
        status, content, kind = await self._forward("POST", scope["path"], body)
        if status != 200:  # the upstream's refusal, as it came (nothing to patch)
            await _send(send, status, content, kind)
            return
        doc = orjson.loads(content)
        out = doc["outputs"][0]
        scores = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        n_outputs = scores.shape[1] if scores.ndim == 2 else 1
        patched = from_log_probs(self.runner.transform_outputs(X, to_log_probs(scores, "logits")), "logits",
                                 n_outputs).astype(np.float32)
        answer = orjson.dumps({"model_name": doc["model_name"], "outputs": [
            {"name": out["name"], "shape": out["shape"], "datatype": "FP32", "data": patched.ravel().tolist()}]})
        await _send(send, 200, answer, b"application/json")

    def _features(self, body: bytes) -> np.ndarray:
        """The request's first tensor as float32 rows, by the cheapest parse the gateway knows: a large body's values
        read by simdjson straight into a float buffer (service.oip's way), a small one by orjson."""
        if simdjson is not None and len(body) >= SIMD_MIN_BYTES:
            tensor = self._parser.parse(body)["inputs"][0]
            shape = tensor["shape"].as_list()
            X = np.frombuffer(tensor["data"].as_buffer(of_type="d"), dtype=np.float64).astype(np.float32)
            del tensor  # the parser is free for the next request once none of its values is held
            return X.reshape(shape)
        tensor = orjson.loads(body)["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9000")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--patch", type=Path, help="a patch file (fairpatch patches export's .fpatch): serve the "
                                               "patched floor (PatchedFloor) with it")
    args = ap.parse_args(argv)
    app = BareProxy(args.upstream) if args.patch is None else \
        PatchedFloor(args.upstream, PatchRunner(Patch.from_bytes(args.patch.read_bytes())))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)  # the loop and HTTP parser `fairpatch serve` gets (uvloop, httptools)


if __name__ == "__main__":
    main()
