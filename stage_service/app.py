"""The web layer: `create_app(settings)` wires routes, middleware, error handlers and lifespan in one place.

Routes only adapt HTTP to the runtime (`runtime.py`) and the next hop (`chain.py`); the wire format lives
in `protocol.py`, statuses in `errors.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from fastapi import FastAPI, Request, Response
from opentelemetry.trace import Span
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from model_export.manifest import TensorSpec
from stage_service import protocol
from stage_service.chain import TIMING_HEADER, NextStage, propagated_headers
from stage_service.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    UpstreamError,
    install_handlers,
)
from stage_service.metrics import InferMetricsMiddleware, StageMetrics
from stage_service.runtime import StageRuntime, load_stage, locate_stage
from stage_service.settings import StageSettings
from stage_service.tracing import (
    ATTR_BODY_IN,
    ATTR_BODY_OUT,
    ATTR_INFER_ID,
    ATTR_STATUS,
    ATTR_TENSOR_BYTES_IN,
    ATTR_TENSOR_BYTES_OUT,
    StageTracing,
    annotate,
)

log = logging.getLogger("stage_service")
PLATFORM = "onnxruntime_onnx"

try:
    SERVICE_VERSION = version("meshpipe")
except PackageNotFoundError:  # running from a source tree without installation
    SERVICE_VERSION = "0.0.0"


@dataclass
class ServiceState:
    """What the routes share: filled in by the lifespan."""

    settings: StageSettings
    metrics: StageMetrics
    tracing: StageTracing
    runtime: StageRuntime | None = None
    next_stage: NextStage | None = None
    ready: bool = False
    inflight: int = 0
    warm_up_task: asyncio.Task[None] | None = field(default=None, repr=False)


class Admission:
    """At most `limit` inference requests in flight; past it, Overloaded (503) at once, never a queue."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def __enter__(self) -> None:
        if self.state.inflight >= self.state.settings.max_inflight:
            raise Overloaded(
                f"stage {self.state.settings.name} has {self.state.inflight} requests in flight "
                f"(STAGE_MAX_INFLIGHT={self.state.settings.max_inflight}); try again"
            )
        self.state.inflight += 1

    def __exit__(self, *_: object) -> None:
        self.state.inflight -= 1


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes is over the limit of {limit} (STAGE_MAX_REQUEST_BYTES)"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (STAGE_MAX_REQUEST_BYTES)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidInput("the client disconnected before sending the whole body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(settings: StageSettings, runtime: StageRuntime | None = None,
               tracing: StageTracing | None = None) -> FastAPI:
    """The ASGI app of one stage. Without `runtime`, the lifespan loads it (all start-up checks included);
    without `tracing`, it is built from the `OTEL_*` environment (`tracing.StageTracing.from_env`)."""
    place = runtime.place if runtime is not None else locate_stage(settings)
    manifest, stage = place.manifest, place.stage
    metrics = StageMetrics(manifest.name, stage.name, place.version)
    if tracing is None:
        tracing = StageTracing.from_env(pipeline=manifest.name, stage=stage.name, version=place.version,
                                        index=place.index, trace_file=settings.trace_file)
    state = ServiceState(settings=settings, metrics=metrics, tracing=tracing, runtime=runtime)
    final_outputs: list[TensorSpec] = list(manifest.outputs)
    final_names = [t.name for t in final_outputs]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.runtime is None:
            state.runtime = await asyncio.to_thread(load_stage, settings)
        next_stage = place.next_stage
        if next_stage is not None and settings.next_url:
            state.next_stage = NextStage(settings.next_url, next_stage.name, settings.timeout_s,
                                         settings.max_inflight, tracing)
        state.warm_up_task = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            state.ready = False
            metrics.ready.set(0)
            state.warm_up_task.cancel()
            if state.next_stage is not None:
                await state.next_stage.aclose()
            state.runtime.close()
            await asyncio.to_thread(tracing.shutdown)  # flushes the last spans

    async def warm_up() -> None:
        assert state.runtime is not None
        try:
            ms = await state.runtime.warm_up()
            log.info("stage %s/%s warm (%.3f ms on %s)", stage.name, place.version, ms, state.runtime.providers)
        except Exception as exc:  # a model whose dynamic dims cannot be 1 still serves real requests
            log.warning("stage %s: warm-up on zeros failed (%s); serving anyway", stage.name, exc)
        state.ready = True
        metrics.ready.set(1)

    app = FastAPI(title=f"stage {stage.name}", version=SERVICE_VERSION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.stage = state
    install_handlers(app)
    app.add_middleware(InferMetricsMiddleware, metrics=metrics)

    def resolve(name: str, model_version: str | None = None) -> bool:
        """True for the pipeline name (first stage only), False for the stage's own; else ModelNotFound."""
        is_pipeline = place.is_first and name == manifest.name
        if name != stage.name and not is_pipeline:
            served = [stage.name] + ([manifest.name] if place.is_first else [])
            raise ModelNotFound(f"model {name!r} is not served here; this process serves {served}")
        if model_version is not None and model_version != place.version:
            raise ModelNotFound(f"model {name!r} has no version {model_version!r}; this stage serves {place.version!r}")
        return is_pipeline

    def require_ready() -> None:
        if not state.ready:
            raise ModelNotReady(f"stage {stage.name} is not ready (warming up or shutting down)")

    # --------------------------------------------------------------------------------- health, metadata

    @app.get("/v2")
    async def server_metadata() -> protocol.ServerMetadata:
        return protocol.ServerMetadata(name="meshpipe-stage-service", version=SERVICE_VERSION,
                                       extensions=["binary_tensor_data"])

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        require_ready()
        return {"ready": True}

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{model_version}/ready")
    async def model_ready(name: str, model_version: str | None = None) -> dict[str, object]:
        resolve(name, model_version)
        require_ready()
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{model_version}")
    async def model_metadata(name: str, model_version: str | None = None) -> protocol.ModelMetadata:
        is_pipeline = resolve(name, model_version)
        inputs = manifest.inputs if is_pipeline else stage.inputs
        return protocol.ModelMetadata(
            name=name,
            versions=[place.version],
            platform=PLATFORM,
            inputs=[protocol.MetadataTensor.from_spec(t) for t in inputs],
            outputs=[protocol.MetadataTensor.from_spec(t) for t in final_outputs],
            parameters={
                "pipeline": manifest.name,
                "stage": stage.name,
                "stage_index": place.index,
                "stages": [s.name for s in manifest.stages[place.index:]],
                "stage_outputs": [protocol.MetadataTensor.from_spec(t).model_dump() for t in stage.outputs],
            },
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------------------- inference

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{model_version}/infer")
    async def infer(name: str, request: Request, model_version: str | None = None) -> Response:
        route = request.scope["route"].path if "route" in request.scope else "/v2/models/{name}/infer"
        with tracing.server(route, request.method, request.scope["path"], request.headers) as span:
            response = await infer_traced(name, request, model_version, span)
            annotate(span, {ATTR_STATUS: response.status_code, ATTR_BODY_OUT: len(response.body)})
            return response

    async def infer_traced(name: str, request: Request, model_version: str | None, span: Span | None) -> Response:
        resolve(name, model_version)
        require_ready()
        assert state.runtime is not None
        with Admission(state):
            body = await read_body(request, settings.max_request_bytes)
            with tracing.span("decode"):
                req, tensors = protocol.decode_request(body, request.headers.get(protocol.HEADER_LENGTH))
            if span is not None:
                span.set_attributes({ATTR_BODY_IN: len(body),
                                     ATTR_TENSOR_BYTES_IN: sum(int(t.nbytes) for t in tensors.values()),
                                     **({ATTR_INFER_ID: req.id} if req.id else {})})
            wanted = [o.name for o in req.outputs] if req.outputs else final_names
            for out in wanted:
                if out not in final_names:
                    raise InvalidInput(f"output {out}: not an output of {name}; its outputs are {final_names}")
            if len(set(wanted)) != len(wanted):
                raise InvalidInput(f"outputs {wanted}: an output is requested twice")

            with tracing.span("inference"):
                outputs, ms = await state.runtime.infer(tensors)
            metrics.inference.observe(ms / 1000.0)
            timing = f"{stage.name}/{place.version}={ms:.3f}"
            if state.next_stage is not None:
                outputs, downstream_timing, seconds = await state.next_stage.infer(
                    outputs, req.id, propagated_headers(request.headers)
                )
                metrics.downstream.observe(seconds)
                if downstream_timing:
                    timing = f"{timing},{downstream_timing}"
            missing = [n for n in wanted if n not in outputs]
            if missing:
                raise UpstreamError(f"next stage {place.next_stage and place.next_stage.name} did not return "
                                    f"outputs {missing}")
            selected: list[tuple[str, np.ndarray, bool]] = [
                (n, outputs[n], protocol.wants_binary(req, n)) for n in wanted
            ]
            if span is not None:
                span.set_attribute(ATTR_TENSOR_BYTES_OUT, sum(int(a.nbytes) for _, a, _ in selected))
            with tracing.span("encode"):
                content, header_length = protocol.encode_response(
                    name, place.version, req.id, protocol.echoed_parameters(req), selected
                )
        headers = {TIMING_HEADER: timing}
        if header_length is None:
            return Response(content, headers=headers, media_type=protocol.JSON_CONTENT_TYPE)
        headers[protocol.HEADER_LENGTH] = str(header_length)
        return Response(content, headers=headers, media_type=protocol.BINARY_CONTENT_TYPE)

    return app
