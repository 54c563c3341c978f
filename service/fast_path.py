"""The one front door for inference: `POST /v2/models/{m}[/versions/{v}]/infer` and
`POST /v1/models/{m}:predict`, as a lean ASGI app.

Through FastAPI a proxied inference request passes about a dozen ASGI layers (error, telemetry and
body-limit middlewares, exception handling, the router, a Request and a Response object) that cost
about as much CPU as the gateway's own work for a small batch (docs/gateway_overhead.md). So the
gateway (service.app) hands these requests to `InferenceEndpoint` before its FastAPI stack; the
same endpoint also sits in the app's route list, which answers the paths' other methods (405) and
serves the POSTs when the gateway is told to route them through its stack (`Settings.fast_path`
off: ASGI middleware of the operator's own then sees them) or runs under a root path.

What the skipped layers did is done here, with their own code: the body limit
(service.body_limit), the `{"error"}` answers (service.errors: a 4xx for the client's mistakes, a
500 for a bug, logged and re-raised to the server as Starlette's error middleware does) and the
content type (JSON, or the binary tensor extension's octet stream: anything else is a 415). The
request itself is served by `service.infer.serve`, the one template for both protocols.
Authentication is not involved: the admin key guards the management API only.
"""

from __future__ import annotations

from time import perf_counter

from starlette.datastructures import State
from starlette.routing import Route, compile_path
from starlette.types import Message, Receive, Scope, Send

from service.binary_tensors import CONTENT_TYPE
from service.body_limit import limited, refuse_declared
from service.errors import ApiError, client_error_response, unexpected_error_response
from service.infer import BINARY_HEADER, PATCH_HEADER, V1_PREDICT_PATH, V2_INFER_PATHS, Answer, serve
from service.patch_serving import SERVED_BY_HEADER
from service.probe import Probe

_V2 = [compile_path(p)[0] for p in V2_INFER_PATHS]  # the same patterns the routes match
_V1 = compile_path(V1_PREDICT_PATH)[0]
_BINARY = BINARY_HEADER.encode("latin-1")
_JSON = b"application/json"
_OCTETS = CONTENT_TYPE.encode("latin-1")
_PATCH, _SERVED_BY = PATCH_HEADER.encode("latin-1"), SERVED_BY_HEADER.encode("latin-1")
# Bodies inference reads: JSON (the protocols' own), the binary tensor extension's octet stream, and no
# declared type at all (Triton's client sends none with binary data).
_ACCEPTED = frozenset({b"", b"application/json", _OCTETS})

Target = tuple[str, str, str | None]  # ("v2" or "v1", model, version)


class _Disconnected(Exception):
    """The client went away before its body arrived: there is nobody to answer."""


class InferenceEndpoint:
    """Serves the inference POSTs of one gateway (`state`: the app's state, filled in at startup)."""

    def __init__(self, state: State, max_body_bytes: int) -> None:
        self.state = state
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def match(scope: Scope) -> Target | None:
        """The target when the request is one of the inference POSTs, else None."""
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

    def routes(self) -> list[Route]:
        """This endpoint as the app's routes for the same paths (POST only, kept out of the generated
        OpenAPI: service.infer documents them)."""
        return [*(Route(p, _Routed(self, "v2"), methods=["POST"], include_in_schema=False) for p in V2_INFER_PATHS),
                Route(V1_PREDICT_PATH, _Routed(self, "v1"), methods=["POST"], include_in_schema=False)]

    async def __call__(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        # The observer (service.observability: metrics, payload log) is set at startup; None when both are off.
        observer = getattr(self.state, "observer", None)
        probe = None if observer is None else Probe(perf_counter())
        try:
            answer = await self._answer(target, scope, receive, probe)
        except _Disconnected:
            return
        except Exception as exc:  # noqa: BLE001 - answered as the app's exception handlers would
            response = client_error_response(exc)
            if response is not None:
                await response(scope, receive, send)
                if probe is not None:
                    observer.failed(target[0], probe, response.status_code, exc)
                return
            if probe is not None:
                observer.failed(target[0], probe, 500, exc)
            await unexpected_error_response(scope["method"], scope["path"], exc)(scope, receive, send)
            raise
        await _send_answer(send, answer)
        if probe is not None:  # after the answer is out: nothing here delays the caller
            observer.served(target[0], probe, answer, scope)

    async def _answer(self, target: Target, scope: Scope, receive: Receive, probe: Probe | None) -> Answer:
        refused = refuse_declared(scope, self.max_body_bytes)
        if refused is not None:
            raise ApiError(*refused)
        kind = _media_type(_header(scope, b"content-type"))
        if kind not in _ACCEPTED and not kind.endswith(b"+json"):
            raise ApiError(415, f"unsupported content type {kind.decode('latin-1')!r}: send the request as "
                                "application/json (or application/octet-stream with the binary tensor extension)")
        body_receive = limited(receive, self.max_body_bytes)

        async def read_body() -> bytes:
            message = await body_receive()
            body = _chunk(message)
            if message.get("more_body", False):
                chunks = [body]
                while message.get("more_body", False):
                    message = await body_receive()
                    chunks.append(_chunk(message))
                body = b"".join(chunks)
            if probe is not None:
                probe.body = body
            return body

        protocol, model, version = target
        binary = _header(scope, _BINARY)
        return await serve(self.state, protocol, model, version, read_body,
                           None if binary is None else binary.decode("latin-1"), probe)


class _Routed:
    """The endpoint as an ASGI app behind the app's router: the route's path parameters name the target."""

    def __init__(self, endpoint: InferenceEndpoint, protocol: str) -> None:
        self.endpoint, self.protocol = endpoint, protocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self.endpoint((self.protocol, params["model_name"], params.get("model_version")), scope, receive, send)


def _chunk(message: Message) -> bytes:
    if message["type"] == "http.disconnect":
        raise _Disconnected
    return message.get("body", b"")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _media_type(value: bytes | None) -> bytes:
    return b"" if value is None else value.split(b";", 1)[0].strip().lower()


async def _send_answer(send: Send, answer: Answer) -> None:
    body = answer.body
    headers = [(b"content-length", str(len(body)).encode()),
               (b"content-type", _JSON if answer.binary_header is None else _OCTETS),
               (_PATCH, (answer.patch or "none").encode("latin-1")), (_SERVED_BY, answer.served_by.encode("latin-1"))]
    if answer.binary_header is not None:
        headers.append((_BINARY, str(answer.binary_header).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

