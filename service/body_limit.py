"""Request body size limit as a pure ASGI middleware, answering 413 in the OIP error shape.

A declared Content-Length over the limit is refused before a byte of the body is read; a chunked
body is counted as it streams in, and the first chunk past the limit aborts the read. (FastAPI's
own `max_body_size` answers with a different body and only exists in recent releases.)
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it and the app's JSON handler renders it.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, 413, BodyTooLarge(self.max_bytes).detail)
            return
        if declared == -1:
            await send_error(send, 400, "invalid Content-Length header")
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            # Normally the app's handler has answered already; this covers reads outside a route.
            if started:
                raise
            await send_error(send, 413, e.detail)


def content_length(scope: Scope) -> int | None:
    """The declared body length, None when absent, -1 when unparseable."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


async def send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
