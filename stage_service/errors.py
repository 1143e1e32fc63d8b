"""Errors of the stage service, one HTTP status each, mapped to responses in one place.

Every error response has the body `{"error": "<message>"}`. Lower-level failures (httpx transport errors,
onnxruntime exceptions, decoding errors) are translated into these classes where they happen
(`chain.py`, `runtime.py`, `protocol.py`); `install_handlers` turns them into responses.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("stage_service")


class StageError(Exception):
    """Base class: an error with an HTTP status and a message for the client."""

    status_code = 500

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
    """The request body is over STAGE_MAX_REQUEST_BYTES (413)."""

    status_code = 413


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


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


def install_handlers(app: FastAPI) -> None:
    """Map every exception to `{"error": ...}` with its status; nothing escapes as an HTML 500."""

    async def stage_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StageError)
        if exc.status_code >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc.status_code, exc.message)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, f"invalid request: {exc}")

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(StageError, stage_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
