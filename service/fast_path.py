"""The inference POSTs as a lean ASGI path, taken before the FastAPI application sees the request.

Through FastAPI a proxied inference request passes about a dozen ASGI layers (error, telemetry and
body-limit middlewares, exception handling, the router, a Request and a Response object) that cost
about as much CPU as the gateway's own work for a small batch. Here the three inference routes
(`POST /v2/models/{m}/infer`, `.../versions/{v}/infer`, `/v1/models/{m}:predict`) are matched with the
router's own patterns and served by the same functions the FastAPI routes call (`infer_answer`,
`predict_answer`), with what the layers they skip did for them done here:

- the body limit (service.body_limit): a declared Content-Length over it is a 413 before anything
  else, an unparseable one a 400; a body that streams past it is a 413 when read;
- errors: the same `{"error"}` answers as the app's handlers (`client_error_response`), a 500 for a
  bug (logged, then re-raised to the server as Starlette's error middleware does);
- the answer's headers (`fairpatch-patch`, `fairpatch-served-by`, content type and length).

Everything else (other methods and paths, a mounted root path, lifespan) goes to FastAPI, whose routes
for the same paths stay in the OpenAPI document and behave the same. Authentication is not involved:
the admin key guards the management API only.
"""

from __future__ import annotations

from starlette.datastructures import State
from starlette.routing import compile_path
from starlette.types import Message, Receive, Scope, Send

from service.binary_tensors import CONTENT_TYPE
from service.body_limit import BodyTooLarge, content_length, send_error
from service.errors import client_error_response, unexpected_error_response
from service.infer import (
    BINARY_HEADER,
    PATCH_HEADER,
    V1_PREDICT_PATH,
    V2_INFER_PATHS,
    Answer,
    infer_answer,
    predict_answer,
)
from service.patch_serving import SERVED_BY_HEADER

_V2 = [compile_path(p)[0] for p in V2_INFER_PATHS]  # the same patterns the router matches
_V1 = compile_path(V1_PREDICT_PATH)[0]
_BINARY = BINARY_HEADER.encode("latin-1")
_JSON = b"application/json"
_OCTETS = CONTENT_TYPE.encode("latin-1")
_PATCH, _SERVED_BY = PATCH_HEADER.encode("latin-1"), SERVED_BY_HEADER.encode("latin-1")


class _Disconnected(Exception):
    """The client went away before its body arrived: there is nobody to answer."""


class FastPath:
    """Serves the inference POSTs of one gateway (`state`: the app's state, filled in at startup)."""

    def __init__(self, state: State, max_body_bytes: int) -> None:
        self.state = state
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def match(scope: Scope) -> tuple[str, str, str | None] | None:
        """("v2" or "v1", model, version) when the request is one of the inference POSTs, else None."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        path = scope["path"]
        if path.startswith("/v2/models/"):
            for pattern in _V2:
                m = pattern.match(path)
                if m is not None:
                    return "v2", m["model_name"], m.groupdict().get("model_version")
        elif path.startswith("/v1/models/"):
            m = _V1.match(path)
            if m is not None:
                return "v1", m["model_name"], None
        return None

    async def __call__(self, route: tuple[str, str, str | None], scope: Scope, receive: Receive,
                       send: Send) -> None:
        limit = self.max_body_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, 413, BodyTooLarge(limit).detail)
            return
        if declared == -1:
            await send_error(send, 400, "invalid Content-Length header")
            return

        async def read_body() -> bytes:
            message = await receive()
            body = _chunk(message)
            if len(body) > limit:
                raise BodyTooLarge(limit)
            if not message.get("more_body", False):
                return body
            chunks, size = [body], len(body)
            while message.get("more_body", False):
                message = await receive()
                chunk = _chunk(message)
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
            return b"".join(chunks)

        kind, model, version = route
        try:
            if kind == "v2":
                answer = await infer_answer(self.state, model, version, read_body, _header(scope, _BINARY))
            else:
                answer = await predict_answer(self.state, model, read_body)
        except _Disconnected:
            return
        except Exception as exc:  # noqa: BLE001 - answered as the app's exception handlers would
            response = client_error_response(exc)
            if response is not None:
                await response(scope, receive, send)
                return
            await unexpected_error_response(scope["method"], scope["path"], exc)(scope, receive, send)
            raise
        await _send_answer(send, answer)


def _chunk(message: Message) -> bytes:
    if message["type"] == "http.disconnect":
        raise _Disconnected
    return message.get("body", b"")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_answer(send: Send, answer: Answer) -> None:
    body = answer.body
    headers = [(b"content-length", str(len(body)).encode()),
               (b"content-type", _JSON if answer.binary_header is None else _OCTETS),
               (_PATCH, (answer.patch or "none").encode("latin-1")), (_SERVED_BY, answer.served_by.encode("latin-1"))]
    if answer.binary_header is not None:
        headers.append((_BINARY, str(answer.binary_header).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
