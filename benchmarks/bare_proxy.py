"""A pass-through proxy on the gateway's own stack, the floor under the gateway's overhead.

    python benchmarks/bare_proxy.py --upstream http://127.0.0.1:9000 --port 9100

uvicorn (httptools, uvloop when installed, no access log) in front of one pooled aiohttp client, as in
`fairpatch serve`: every POST is read whole and sent to the same path on the upstream, and the answer's
status, content type and body come back unchanged. No parsing, no patch, no Redis: what any Python proxy
built from these parts adds to a request on this machine. `benchmarks/gateway_overhead.py --floor`
measures it in the same rounds as the gateway.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from starlette.types import Receive, Scope, Send


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {"content-type": "application/json"}
        for attempt in (0, 1):  # one retry of a reused keep-alive connection the upstream closed, as the gateway
            try:
                async with self.session.request(scope["method"], self.upstream + scope["path"], data=body,
                                                headers=headers) as response:
                    status, content = response.status, await response.read()
                    kind = response.headers.get("content-type", "application/json")
                break
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if attempt:
                    raise
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind.encode("latin-1")),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9000")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    uvicorn.run(BareProxy(args.upstream), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)  # the loop and HTTP parser `fairpatch serve` gets (uvloop, httptools)


if __name__ == "__main__":
    main()
