"""The data plane of one stage: decode → infer → forward → encode, whatever transport the request came by.

KServe's shape (`protocol/dataplane.py`): the REST routes (`app.py`), and a gRPC servicer should one come,
hand `DataPlane.infer` a request whose body has fully arrived and send back what it answers; every other
route is one call of `resolve`, `require_ready` or a metadata method here. Tracing (`tracing.StageTracing`)
and metrics (`metrics.StageMetrics`) are collaborators it calls; the model is `runtime.StageRuntime`, the
next hop `chain.NextStage`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import Span

from stage_service import protocol
from stage_service.chain import PIPELINE_VERSION_HEADER, NextStage, propagated_headers
from stage_service.errors import InvalidInput, ModelNotFound, ModelNotReady, UpstreamError
from stage_service.limits import Admission, BatchLimit, BodyBudget
from stage_service.metrics import StageMetrics
from stage_service.runtime import StageRuntime
from stage_service.settings import GATEWAY_HEADER, StageSettings
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
INFER_ROUTE = "/v2/models/{name}/infer"


@dataclass(frozen=True)
class InferCall:
    """One inference request as a transport hands it over: the model asked for, the whole body, the headers
    (case-insensitive: the tracing context and the propagated pipeline headers are read from them)."""

    model: str
    version: str | None
    body: bytes
    header_length: str | None
    headers: Mapping[str, str]
    route: str = INFER_ROUTE
    path: str = ""
    # Whether the transport sees every request in the stage from its first byte (HTTP: the body budget is held
    # from the headers on). gRPC does not: its messages are received out of sight, so its runs never go inline.
    sees_arrivals: bool = True
    # The binary tensors apart from `body`, which then is the JSON header alone (gRPC's raw_input_contents, in
    # order): read where they lie instead of joined behind the header, one copy of the tensors fewer.
    sections: Sequence[bytes] | None = None

    @property
    def size(self) -> int:
        """The request's bytes: the body and any sections apart."""
        return len(self.body) + sum(len(s) for s in self.sections or ())


@dataclass(frozen=True)
class InferAnswer:
    """The encoded response: the body, its JSON header's length when any output is binary, and the timing
    entries of this stage and every stage after it (`x-stage-timing`)."""

    content: bytes
    header_length: int | None
    timing: str


class DataPlane:
    """Everything one stage does with a request, apart from HTTP."""

    def __init__(self, settings: StageSettings, runtime: StageRuntime, tracing: StageTracing,
                 metrics: StageMetrics, service_version: str) -> None:
        self.place = runtime.place
        self.runtime = runtime
        self.tracing = tracing
        self.metrics = metrics
        self.service_version = service_version
        self.admission = Admission(self.place.stage.name, settings.max_inflight)
        self.body_budget = BodyBudget(self.place.stage.name, settings.buffered_bytes_limit)
        self.batch_limit = BatchLimit.for_stages(self.place.manifest.stages[self.place.index:],
                                                 settings.max_request_bytes, settings.max_request_batch)
        self.max_json_values = settings.max_json_values
        following = self.place.next_stage
        self.next_stage = (NextStage(settings.next_url, following.name, settings.timeout_s, settings.max_inflight,
                                     tracing, str(settings.next_uds) if settings.next_uds else None)
                           if following is not None and settings.next_url else None)
        self.final_names = [t.name for t in self.place.manifest.outputs]
        self.split = self.place.manifest.split_id
        self.ready = False
        runtime.on_run = metrics.batch_size.observe

    # ------------------------------------------------------------------------------ lifecycle

    async def warm_up(self) -> None:
        """One run on zeros, then ready. A model whose dynamic dims cannot be 1 still serves real requests."""
        stage = self.place.stage.name
        try:
            ms = await self.runtime.warm_up()
            log.info("stage %s/%s warm (%.3f ms on %s)", stage, self.place.version, ms, self.runtime.providers)
        except Exception as exc:
            log.warning("stage %s: warm-up on zeros failed (%s); serving anyway", stage, exc)
        self.set_ready(True)

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    async def close(self) -> None:
        """Not ready, then the next hop's connections, the session, and the last spans flushed."""
        self.set_ready(False)
        if self.next_stage is not None:
            await self.next_stage.aclose()
        self.runtime.close()
        await asyncio.to_thread(self.tracing.shutdown)

    # ------------------------------------------------------------------------- model repository

    def resolve(self, name: str, model_version: str | None = None,
                headers: Mapping[str, str] | None = None) -> bool:
        """True for the pipeline name (first stage only), False for the stage's own; else ModelNotFound, naming
        what a caller at this door uses: the pipeline at the first stage (the only one clients reach; its stage
        names are internal, and refused to a request that came through the gateway: `GATEWAY_HEADER`), the
        stage elsewhere."""
        place = self.place
        is_pipeline = place.is_first and name == place.manifest.name
        from_gateway = place.is_first and headers is not None and GATEWAY_HEADER in headers
        if not is_pipeline and (name != place.stage.name or from_gateway):
            served = place.manifest.name if place.is_first else place.stage.name
            raise ModelNotFound(f"model {name!r} is not served here; this process serves {served!r}")
        if model_version is not None and model_version != place.version:
            raise ModelNotFound(f"model {name!r} has no version {model_version!r}; this stage serves "
                                f"{place.version!r}")
        return is_pipeline

    def require_ready(self) -> None:
        if not self.ready:
            raise ModelNotReady(f"stage {self.place.stage.name} is not ready (warming up or shutting down)")

    def server_metadata(self) -> protocol.ServerMetadata:
        return protocol.ServerMetadata(name="meshpipe-stage-service", version=self.service_version,
                                       extensions=["binary_tensor_data"])

    def model_metadata(self, name: str, model_version: str | None = None,
                       headers: Mapping[str, str] | None = None) -> protocol.ModelMetadata:
        """The pipeline's inputs (first stage, pipeline name) or the stage's; always the final outputs."""
        place = self.place
        inputs = place.manifest.inputs if self.resolve(name, model_version, headers) else place.stage.inputs
        return protocol.ModelMetadata(
            name=name,
            versions=[place.version],
            platform=PLATFORM,
            inputs=[protocol.MetadataTensor.from_spec(t) for t in inputs],
            outputs=[protocol.MetadataTensor.from_spec(t) for t in place.manifest.outputs],
            parameters={
                "pipeline": place.manifest.name,
                "stage": place.stage.name,
                "stage_index": place.index,
                "stages": [s.name for s in place.manifest.stages[place.index:]],
                "stage_outputs": [protocol.MetadataTensor.from_spec(t).model_dump() for t in place.stage.outputs],
            },
        )

    # -------------------------------------------------------------------------------- inference

    async def infer(self, call: InferCall) -> InferAnswer:
        """Decode, run this stage, forward to the next, encode the outputs asked for: one SERVER span."""
        with self.tracing.server(call.route, "POST", call.path, call.headers) as span:
            self.resolve(call.model, call.version, call.headers)
            self.require_ready()
            with self.admission:
                answer = await self._infer(call, span)
            annotate(span, {ATTR_STATUS: 200, ATTR_BODY_OUT: len(answer.content)})
            return answer

    def alone(self, call: InferCall) -> bool:
        """Whether `call` is the only request in the stage: no other in the data plane, and no other body being
        received or held (the body budget holds just this one's), as far as its transport lets us see."""
        return call.sees_arrivals and self.admission.inflight == 1 and self.body_budget.used <= call.size

    def check_split(self, headers: Mapping[str, str]) -> str | None:
        """The split the request is pinned to (`x-pipeline-version`), if any; InvalidInput if it is not this
        stage's: its tensors would not fit (the mesh routes on the header, so only a client's mistake or a
        misrouted hop lands here)."""
        pinned = headers.get(PIPELINE_VERSION_HEADER)
        if pinned is not None and pinned != self.split:
            raise InvalidInput(f"{PIPELINE_VERSION_HEADER} {pinned!r} is not served here: stage "
                               f"{self.place.stage.name} belongs to split {self.split!r}")
        return pinned

    async def _infer(self, call: InferCall, span: Span | None) -> InferAnswer:
        pinned = self.check_split(call.headers)
        request, tensors = self._decode(call, span)
        wanted = self._wanted_outputs(request, call.model)
        with self.tracing.span("inference"):
            self.batch_limit.check(self.runtime.check_inputs(tensors, call.model))  # before any work: 400, 413
            outputs, ms = await self.runtime.infer(tensors, alone=self.alone(call))
        self.metrics.inference.observe(ms / 1000.0)
        # A pinned request's entries name the split that served each stage: one split end to end, or a bug.
        where = f"{self.place.version}@{self.split}" if pinned else self.place.version
        timing = f"{self.place.stage.name}/{where}={ms:.3f}"
        if self.next_stage is not None:
            outputs, downstream_timing = await self._forward(outputs, request.id, call.headers)
            if downstream_timing:
                timing = f"{timing},{downstream_timing}"
        content, header_length = self._encode(call.model, request, outputs, wanted, span)
        return InferAnswer(content, header_length, timing)

    def _decode(self, call: InferCall, span: Span | None) -> tuple[protocol.InferenceRequest, dict[str, np.ndarray]]:
        with self.tracing.span("decode"):
            request, tensors = protocol.decode_request(call.body, call.header_length, self.max_json_values,
                                                       call.sections)
        annotate(span, {ATTR_BODY_IN: call.size,
                        ATTR_TENSOR_BYTES_IN: sum(int(t.nbytes) for t in tensors.values()),
                        **({ATTR_INFER_ID: request.id} if request.id else {})})
        return request, tensors

    def _wanted_outputs(self, request: protocol.InferenceRequest, model: str) -> list[str]:
        """The outputs to answer, in order: those the request names (each a final output, once), else all."""
        wanted = [o.name for o in request.outputs] if request.outputs else self.final_names
        for out in wanted:
            if out not in self.final_names:
                raise InvalidInput(f"output {out}: not an output of {model}; its outputs are {self.final_names}")
        if len(set(wanted)) != len(wanted):
            raise InvalidInput(f"outputs {wanted}: an output is requested twice")
        return wanted

    async def _forward(self, outputs: dict[str, np.ndarray], request_id: str | None,
                       headers: Mapping[str, str]) -> tuple[dict[str, np.ndarray], str | None]:
        """The final outputs, from the rest of the chain, and its timing entries."""
        assert self.next_stage is not None
        final, timing, seconds = await self.next_stage.infer(outputs, request_id, propagated_headers(headers))
        self.metrics.downstream.observe(seconds)
        return final, timing

    def _encode(self, model: str, request: protocol.InferenceRequest, outputs: dict[str, np.ndarray],
                wanted: list[str], span: Span | None) -> tuple[bytes, int | None]:
        missing = [n for n in wanted if n not in outputs]
        if missing:
            following = self.place.next_stage
            raise UpstreamError(f"next stage {following and following.name} did not return outputs {missing}")
        selected = [(n, outputs[n], protocol.wants_binary(request, n)) for n in wanted]
        annotate(span, {ATTR_TENSOR_BYTES_OUT: sum(int(a.nbytes) for _, a, _ in selected)})
        with self.tracing.span("encode"):
            return protocol.encode_response(model, self.place.version, request.id,
                                            protocol.echoed_parameters(request), selected)
