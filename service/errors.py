"""Every error leaves a server as `{"error": "..."}` (the OIP error shape) with a fitting status.

Bad input is the client's problem and gets a 4xx that says what to fix; only a genuine bug reaches
the catch-all, which still answers JSON (500) instead of Starlette's plain-text page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Send

from service.oip import InvalidRequest, describe_validation_errors

log = logging.getLogger("fairpatch.service")


class ApiError(Exception):
    """An error with a status code and a message for the client (unknown model -> 404, ...)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


async def send_error(send: Send, status_code: int, message: str) -> None:
    """`error_response` sent on a bare ASGI `send`: for answers given before any route runs (the body
    limit's 413, a bad Content-Length)."""
    response = error_response(status_code, message)
    await send({"type": "http.response.start", "status": status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def client_error_response(exc: Exception) -> JSONResponse | None:
    """The answer for an error the client is told about (ApiError, InvalidRequest, an HTTPException such
    as the body limit's 413); None for anything else. The app's handlers below and the inference endpoint
    (service.fast_path) both answer with it, so every route says the same."""
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.message)
    if isinstance(exc, InvalidRequest):
        return error_response(400, str(exc))
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    return None


def unexpected_error_response(method: str, path: str, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s: %r", method, path, exc)
    # The exception is re-raised to the server afterwards (Starlette's error middleware does so, and the
    # fast path does the same), and uvicorn then closes the connection: saying so stops a keep-alive
    # client from sending its next request down a socket about to be reset.
    return error_response(500, f"internal server error ({type(exc).__name__}); see the server log",
                          {"connection": "close"})


async def _client_error(_request: Request, exc: ApiError | InvalidRequest) -> JSONResponse:
    return client_error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Covers routing too: unknown paths (404) and wrong methods (405, keeping its Allow header).
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        if allowed:  # the router names the first route that matched the path; list every route's methods
            headers = {**{k: v for k, v in (headers or {}).items() if k.lower() != "allow"},
                       "allow": ", ".join(allowed)}
        if message == "Method Not Allowed":
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
    return error_response(exc.status_code, message, headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app fully matches on the request's path (asked of each route, included
    routers too, through the routes' own `matches`)."""
    routes = request.app.router.routes
    return [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # 400 rather than FastAPI's 422: the OIP reports every malformed request as 400.
    return error_response(400, f"invalid request: {describe_validation_errors(exc.errors())}")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error_response(request.method, request.url.path, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _client_error)
    app.add_exception_handler(InvalidRequest, _client_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
