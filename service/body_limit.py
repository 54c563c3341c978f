"""The request body size limit, in one place: a pure ASGI middleware for the FastAPI application and the
same rule for the inference endpoint (service.fast_path), both answering 413 in the `{"error"}` shape.

A declared Content-Length over the limit is refused before a byte of the body is read; a chunked
body is counted as it streams in, and the first chunk past the limit aborts the read. (FastAPI's
own `max_body_size` answers with a different body and only exists in recent releases.)
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import send_error


class BodyTooLarge(HTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it and the app's JSON handler renders it.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit")


def refuse_declared(scope: Scope, limit: int) -> tuple[int, str] | None:
    """(status, message) when the declared Content-Length alone settles it: over the limit (413) or
    unparseable (400); None when the body may be read."""
    declared = content_length(scope)
    if declared is not None and declared > limit:
        return 413, BodyTooLarge(limit).detail
    if declared == -1:
        return 400, "invalid Content-Length header"
    return None


def limited(receive: Receive, limit: int) -> Receive:
    """`receive`, raising BodyTooLarge as soon as the body streamed so far is over `limit`."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return limited_receive


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refuse_declared(scope, self.max_bytes)
        if refused is not None:
            await send_error(send, *refused)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited(receive, self.max_bytes), tracking_send)
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
