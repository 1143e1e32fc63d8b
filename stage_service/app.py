"""The web layer: `create_app(settings, runtime, tracing)` wires routes, middleware, error handlers and lifespan.

The routes (`router`) only adapt HTTP to the data plane (`dataplane.DataPlane`): each reads what the request
carries, makes one call, and turns the answer into a response. The wire format lives in `protocol.py`,
statuses in `errors.py`.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from stage_service import protocol
from stage_service.chain import TIMING_HEADER
from stage_service.dataplane import INFER_ROUTE, DataPlane, InferAnswer, InferCall
from stage_service.errors import (
    ErrorBoundary,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    StageError,
    UnsupportedMediaType,
    install_handlers,
    stage_error_response,
)
from stage_service.limits import BodyBudget, Held
from stage_service.metrics import InferMetricsMiddleware, StageMetrics
from stage_service.runtime import StageRuntime
from stage_service.settings import StageSettings
from stage_service.tracing import StageTracing

# gRPC calls in flight when the stage stops (after uvicorn's own graceful shutdown) get this long to finish.
GRPC_GRACE_S = 5.0

try:
    SERVICE_VERSION = version("meshpipe")
except PackageNotFoundError:  # running from a source tree without installation
    SERVICE_VERSION = "0.0.0"


async def get_plane(request: Request) -> DataPlane:
    """Async, so FastAPI calls it on the event loop: a plain function dependency is run on a worker thread, a thread
    hop on every health check and metadata request."""
    plane: DataPlane = request.app.state.plane
    return plane


Plane = Annotated[DataPlane, Depends(get_plane)]
router = APIRouter()
GET = ["GET", "HEAD"]  # HEAD wherever GET (RFC 9110): FastAPI's routes do not add it as Starlette's do


@router.api_route("/v2", methods=GET)
async def server_metadata(plane: Plane) -> protocol.ServerMetadata:
    return plane.server_metadata()


@router.api_route("/v2/health/live", methods=GET)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.api_route("/v2/health/ready", methods=GET)
async def ready(plane: Plane) -> dict[str, bool]:
    plane.require_ready()
    return {"ready": True}


@router.api_route("/v2/models/{name}/ready", methods=GET)
@router.api_route("/v2/models/{name}/versions/{model_version}/ready", methods=GET)
async def model_ready(name: str, request: Request, plane: Plane,
                      model_version: str | None = None) -> dict[str, object]:
    plane.resolve(name, model_version, request.headers)
    plane.require_ready()
    return {"name": name, "ready": True}


@router.api_route("/v2/models/{name}", methods=GET)
@router.api_route("/v2/models/{name}/versions/{model_version}", methods=GET)
async def model_metadata(name: str, request: Request, plane: Plane,
                         model_version: str | None = None) -> protocol.ModelMetadata:
    return plane.model_metadata(name, model_version, request.headers)


@router.api_route("/metrics", methods=GET)
async def prometheus_metrics(plane: Plane) -> Response:
    return Response(generate_latest(plane.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place, to stand alone inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return walk(defs[node["$ref"].rsplit("/", 1)[-1]]) if "$ref" in node else {
                k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return cast(dict[str, Any], walk(schema))


# The body is read raw (JSON, or the binary extension's JSON header and tensors): documented here instead.
INFER_BODY = {"requestBody": {"required": True, "content": {
    protocol.JSON_CONTENT_TYPE: {"schema": _inlined(protocol.InferenceRequest.model_json_schema())},
    protocol.BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
}}}


INFER_VERSION_ROUTE = "/v2/models/{name}/versions/{model_version}/infer"


@router.post(INFER_ROUTE, openapi_extra=INFER_BODY)
@router.post(INFER_VERSION_ROUTE, openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, plane: Plane, model_version: str | None = None) -> Response:
    """What FastAPI would serve; `InferFastPath` answers these paths first, through `serve_infer` too."""
    return await serve_infer(request, plane, name, model_version)


async def serve_infer(request: Request, plane: DataPlane, name: str, model_version: str | None) -> Response:
    settings: StageSettings = request.app.state.settings
    budget: BodyBudget = request.app.state.body_budget
    with budget.account() as take:
        body = await read_body(request, settings.max_request_bytes, settings.body_timeout_s, take)
        encoding = request.headers.get("content-encoding")
        if encoding is not None:
            body = decoded_body(body, encoding, settings.max_request_bytes, take)
        call = InferCall(model=name, version=model_version, body=body,
                         header_length=request.headers.get(protocol.HEADER_LENGTH), headers=request.headers,
                         route=INFER_ROUTE if model_version is None else INFER_VERSION_ROUTE,
                         path=request.scope["path"])
        return answer_response(await plane.infer(call))


INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class InferFastPath:
    """The ASGI app a stage serves: POST `.../infer` goes to `serve_infer` behind the stage's own error boundary,
    metrics and error answers, every other request (and the lifespan) to the FastAPI app. FastAPI's routing,
    dependency injection and its own middleware took about 1 ms of the 1.5 ms a tiny request costs a stage on
    the 2-core test machine (py-spy): paid by every stage of the chain on every request."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.plane: DataPlane = app.state.plane
        self.infer = ErrorBoundary(InferMetricsMiddleware(self._infer, self.plane.metrics))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if path is None:
            await self.app(scope, receive, send)
            return
        scope["app"], scope["path_params"] = self.app, path.groupdict()
        await self.infer(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        try:
            response = await serve_infer(Request(scope, receive), self.plane, params["name"], params["version"])
        except StageError as exc:
            response = stage_error_response(exc)
        await response(scope, receive, send)


async def read_body(request: Request, limit: int, timeout_s: float, take: Held) -> bytes:
    """The whole body, within `timeout_s` (else 408, closing the connection), refusing (413) as soon as it is
    known to exceed `limit` bytes; uvicorn then reads and drops the rest (within the protocol's body guard)
    and the connection stays usable: closing it with the body unread would reset it, and the caller might
    lose the answer. No STAGE_MAX_INFLIGHT slot is held meanwhile: a slow client holds a connection only
    (STAGE_MAX_CONNECTIONS bounds those), and every chunk is taken from the body budget (`take`: 503 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} "
                              "(STAGE_MAX_REQUEST_BYTES)")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_chunks(request, limit, take)
    except TimeoutError:
        raise RequestTimeout(f"the request's body did not arrive within {timeout_s:g} s "
                             "(STAGE_BODY_TIMEOUT_S)") from None
    except ClientDisconnect:
        raise InvalidInput("the client disconnected before sending the whole body") from None


async def _read_chunks(request: Request, limit: int, take: Held) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        if not chunk:  # Starlette's stream ends with b"": not a chunk to join (one copy of the whole body)
            continue
        take(len(chunk))
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (STAGE_MAX_REQUEST_BYTES)")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


DECODED = {"gzip", "x-gzip", "deflate"}  # what tritonclient's request_compression_algorithm sends
DECODE_STEP = 1 << 20  # bytes inflated at a time, each taken from the body budget before the next


def decoded_body(body: bytes, encoding: str, limit: int, take: Held) -> bytes:
    """The body as it was before its Content-Encoding (gzip, or deflate: zlib's format), at most `limit` bytes;
    Inference-Header-Content-Length counts the decoded body, as in Triton. What it inflates is taken from the body
    budget a step at a time (`take`: 503 past it) and the compressed bytes given back once decoded. 415 for an
    encoding it does not decode, 413 past the limit (read no further: a small compressed body can inflate a
    thousandfold), 400 for a stream that is cut short or is not what it says."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    if name not in DECODED:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not decoded here; send the body as it is, or "
                                   "compressed with gzip or deflate")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # | 32: a gzip or a zlib header, whichever it has
    parts: list[bytes] = []
    size, pending = 0, body
    try:
        while not inflater.eof:
            part = inflater.decompress(pending, DECODE_STEP)
            if not part and len(inflater.unconsumed_tail) == len(pending):
                break  # no more comes out of it: the stream is cut short
            pending = inflater.unconsumed_tail
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the {name} body decodes to over the limit of {limit} bytes "
                                      "(STAGE_MAX_REQUEST_BYTES)")
            take(len(part))
            parts.append(part)
    except zlib.error as exc:
        raise InvalidInput(f"the body is not {name} data as its Content-Encoding says ({exc})") from None
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"the {name} body is {'cut short' if not inflater.eof else 'followed by other data'}; "
                           "expected one complete compressed stream")
    take.give_back(len(body))  # the compressed bytes are let go once decoded
    return b"".join(parts)


def answer_response(answer: InferAnswer) -> Response:
    headers = {TIMING_HEADER: answer.timing}
    if answer.header_length is None:
        return Response(answer.content, headers=headers, media_type=protocol.JSON_CONTENT_TYPE)
    headers[protocol.HEADER_LENGTH] = str(answer.header_length)
    return Response(answer.content, headers=headers, media_type=protocol.BINARY_CONTENT_TYPE)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Warm up in the background (readiness says when it is done); on shutdown, close the data plane."""
    plane: DataPlane = app.state.plane
    grpc_server = await start_grpc(app)
    warm_up = asyncio.create_task(plane.warm_up())
    try:
        yield
    finally:
        warm_up.cancel()
        if grpc_server is not None:
            await grpc_server.stop(GRPC_GRACE_S)
        await plane.close()


async def start_grpc(app: FastAPI) -> Any | None:
    """The KServe v2 gRPC server on STAGE_GRPC_PORT or STAGE_GRPC_UDS, on the same data plane; None where both
    are unset."""
    settings: StageSettings = app.state.settings
    if not settings.serves_grpc:
        return None
    from stage_service.grpc_service import InferenceServicer, grpc_address, start_server  # imported only to serve

    servicer = InferenceServicer(app.state.plane, app.state.body_budget, settings.max_request_bytes)
    return await start_server(grpc_address(settings), servicer)


def create_app(settings: StageSettings, runtime: StageRuntime, tracing: StageTracing) -> FastAPI:
    """The ASGI app of one stage, serving `runtime` (loaded and checked by `runtime.load_stage`)."""
    place = runtime.place
    metrics = StageMetrics(place.manifest.name, place.stage.name, place.version)
    # No redirect of a path with a trailing slash: Starlette's would name http:// behind a TLS gateway (a 404 instead)
    app = FastAPI(title=f"stage {place.stage.name}", version=SERVICE_VERSION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.settings = settings
    app.state.plane = DataPlane(settings, runtime, tracing, metrics, SERVICE_VERSION)
    app.state.body_budget = app.state.plane.body_budget
    install_handlers(app, router.routes)
    app.add_middleware(InferMetricsMiddleware, metrics=metrics)
    app.add_middleware(ErrorBoundary)  # added last: the outermost of the app's own
    app.include_router(router)
    return app
