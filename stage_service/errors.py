"""Errors of the stage service, one HTTP status each, mapped to responses in one place.

Every error response has the body `{"error": "<message>"}`. Lower-level failures (httpx transport errors,
onnxruntime exceptions, decoding errors) are translated into these classes where they happen
(`chain.py`, `runtime.py`, `protocol.py`); `install_handlers` turns them into responses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("stage_service")


class StageError(Exception):
    """Base class: an error with an HTTP status and a message for the client. `close_connection`: the answer
    says `Connection: close` and the connection ends (the rest of the request was not read)."""

    status_code = 500
    close_connection = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(StageError):
    """The request is malformed or its tensors do not fit the model (400)."""

    status_code = 400


class ModelNotFound(StageError):
    """The model name is neither this stage nor (on the first stage) the pipeline (404)."""

    status_code = 404


class PayloadTooLarge(StageError):
    """The request is over a size limit: its body, its JSON, or the activations its batch would make (413)."""

    status_code = 413


class UnsupportedMediaType(StageError):
    """The body comes in a Content-Encoding the stage does not decode (415)."""

    status_code = 415


class RequestTimeout(StageError):
    """The body did not arrive within STAGE_BODY_TIMEOUT_S (408; the connection is closed)."""

    status_code = 408
    close_connection = True


class ModelNotReady(StageError):
    """Warm-up has not finished, or the process is shutting down (503)."""

    status_code = 503


class Overloaded(StageError):
    """STAGE_MAX_INFLIGHT requests are already in flight (503, answered at once)."""

    status_code = 503


class UpstreamError(StageError):
    """The next stage could not be reached or answered with an error (502, or its own 502/503/504)."""

    status_code = 502

    def __init__(self, message: str, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code


class UpstreamTimeout(StageError):
    """The next stage did not answer within STAGE_TIMEOUT_S (504)."""

    status_code = 504


class InferenceFailed(StageError):
    """onnxruntime failed on inputs that passed validation: a fault of the model or runtime (500)."""

    status_code = 500


class StartupError(Exception):
    """The service cannot start: the message names the setting (`STAGE_...`) at fault."""


def error_response(status_code: int, message: str, close_connection: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code,
                        headers={"connection": "close"} if close_connection else None)


def stage_error_response(exc: StageError) -> JSONResponse:
    """A stage error's answer: `{"error": message}` with its status (a 5xx is also logged)."""
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(exc.status_code, exc.message, exc.close_connection)


class ErrorBoundary:
    """Pure ASGI middleware, outermost of the app's own: an exception nothing else handled becomes a 500
    `{"error": ...}` here. Starlette's ServerErrorMiddleware would answer it too but then re-raise, and
    uvicorn closes a connection whose app raised: the caller's next request on it was reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unexpected error", exc_info=exc)
            if started:  # too late to answer: uvicorn closes the connection
                raise
            await error_response(500, f"internal error: {type(exc).__name__}")(scope, receive, send)


VERSIONED = "/versions/{model_version}"


def served_routes(routes: Sequence[BaseRoute]) -> str:
    """What `routes` serve, for the 404 of a path none takes, in their order: `METHOD path`, HEAD left
    out (it goes with GET), a path's `/versions/{model_version}` twin folded into it as `[...]`."""
    served = {(method, route.path): None for route in routes if isinstance(route, Route)
              for method in sorted(route.methods or ()) if method != "HEAD"}
    shown = []
    for method, path in served:
        if VERSIONED in path:
            continue
        twin = path.replace("/{name}", "/{name}" + VERSIONED, 1)
        if twin != path and (method, twin) in served:
            path = path.replace("/{name}", "/{name}[" + VERSIONED + "]", 1)
        shown.append(f"{method} {path}")
    return ", ".join(shown)


def _routing_detail(request: Request, exc: StarletteHTTPException, served: str) -> str:
    """Starlette's bare "Not Found" / "Method Not Allowed" for a request no route takes, said in full."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"no route for {where}; a stage serves {served}"
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "other methods")
        return f"{where}: method not allowed; this path takes {allowed}"
    return str(exc.detail)


def install_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Map the errors to `{"error": ...}` with their status (anything else: `ErrorBoundary`); a 404 names what
    `routes` serve."""
    served = served_routes(routes)

    async def stage_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StageError)
        return stage_error_response(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = error_response(exc.status_code, _routing_detail(request, exc, served))
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110: it must name the methods)
        return response

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, f"invalid request: {exc}")

    app.add_exception_handler(StageError, stage_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
