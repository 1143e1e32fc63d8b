"""OpenTelemetry for the stage service: every piece of tracing set-up lives here; routes only call into it.

Per inference request: a SERVER span that continues the caller's trace (W3C `traceparent` or B3, whichever
the request carries; W3C wins where both do and disagree, as Envoy's OpenTelemetry tracer, the provider
Istio is set up with here, rewrites only `traceparent` on every hop), with INTERNAL
children `decode`, `inference` and `encode` and a CLIENT child `forward` for the hop to the next stage,
whose context goes out as W3C *and* B3 headers so that the mesh's own spans (Envoy, Istio) join the trace.

Configured by the standard variables only, read once at start-up (`StageTracing.from_env`):

- `OTEL_TRACES_EXPORTER`: comma-separated `otlp`, `console`, `none`. Unset, it is `otlp` where an OTLP
  endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `none`
  otherwise, so that a process nobody collects from pays nothing (the spec's default would be `otlp`).
- OTLP is OTLP/HTTP protobuf (`OTEL_EXPORTER_OTLP_*`: endpoint, headers, timeout, certificates);
  `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` may only be `http/protobuf`.
- `OTEL_PROPAGATORS`: default `b3multi,tracecontext` (extracted in that order, the last found wins; both
  injected); also `b3` (single header), `baggage`, `none`. With Istio's Zipkin provider, which rewrites B3,
  `tracecontext,b3multi` links the sidecars' spans as parents instead.
- `OTEL_SERVICE_NAME` (default: the stage's name), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
  and `_ARG` (default `parentbased_always_on`), `OTEL_BSP_*`, `OTEL_SDK_DISABLED=true`,
  `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT` (default here 1024 characters, so a huge request id cannot bloat spans).
- `STAGE_TRACE_FILE`: besides those, append every span as one JSON line to this file (the local mesh sets
  it for each process, and `python -m mesh trace` reads it back). `{stage}`, `{version}` and `{pid}` in
  the path are replaced, so that processes sharing one environment write files of their own (a file
  belongs to one process). See `span_record` for the fields.

With no exporter, no provider is built: every call below is a no-op context manager and the trace headers
of a request are passed on unchanged, as they were before tracing existed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stage_service.errors import StageError, StartupError

TRACE_FILE_ENV = "STAGE_TRACE_FILE"
INSTRUMENTATION = "meshpipe.stage_service"
# Spans reach the file this soon after they end (unless OTEL_BSP_SCHEDULE_DELAY says otherwise), so that
# `mesh trace --last` right after a request finds it; the OTLP exporter keeps the SDK's 5 s default.
FILE_FLUSH_DELAY_MS = 200
# Attribute values and error messages are cut to this many characters unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT
# says otherwise (the SDK's default is no limit): a request's id or tensor names may be a megabyte long.
ATTRIBUTE_LENGTH_LIMIT = 1024
# Incoming trace headers that the forward span replaces with its own context.
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "b3"})
TRACE_HEADER_PREFIX = "x-b3-"
REQUEST_ID_HEADER = "x-request-id"

# Span attributes (OpenTelemetry semantic conventions where one exists, `meshpipe.*` otherwise).
ATTR_PIPELINE = "meshpipe.pipeline"
ATTR_STAGE = "meshpipe.stage"
ATTR_VERSION = "meshpipe.stage.version"
ATTR_INDEX = "meshpipe.stage.index"
ATTR_REQUEST_ID = "meshpipe.request_id"  # the x-request-id header (Envoy's), the same on every hop
ATTR_INFER_ID = "meshpipe.infer.id"  # the v2 request's own "id", when it has one
ATTR_TENSOR_BYTES_IN = "meshpipe.tensor.bytes_in"
ATTR_TENSOR_BYTES_OUT = "meshpipe.tensor.bytes_out"
ATTR_NEXT_STAGE = "meshpipe.next_stage"
ATTR_STATUS = "http.response.status_code"
ATTR_ERROR_TYPE = "error.type"
ATTR_BODY_IN = "http.request.body.size"
ATTR_BODY_OUT = "http.response.body.size"

# OTEL_PROPAGATORS names; extraction runs in the listed order and a later one overrides an earlier one.
PROPAGATORS: dict[str, type[TextMapPropagator]] = {
    "tracecontext": TraceContextTextMapPropagator, "b3multi": B3MultiFormat, "b3": B3SingleFormat,
    "baggage": W3CBaggagePropagator,
}
DEFAULT_PROPAGATORS = "b3multi,tracecontext"
_NOOP = contextlib.nullcontext()


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as the JSON-lines file holds it: ids in hex, times in ns since the epoch."""
    ctx = span.context
    assert ctx is not None
    parent = span.parent
    return {
        "trace_id": _hex(ctx.trace_id, 32),
        "span_id": _hex(ctx.span_id, 16),
        "parent_span_id": _hex(parent.span_id, 16) if parent is not None else None,
        "parent_remote": bool(parent.is_remote) if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": {"code": span.status.status_code.name, "message": span.status.description},
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
        "service": span.resource.attributes.get(SERVICE_NAME),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to a file, one JSON object a line (see `span_record`); for the local mesh."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str, separators=(",", ":")) + "\n" for s in spans)
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(var)
        if protocol:
            if protocol != "http/protobuf":
                raise StartupError(f"{var}: {protocol!r} is not supported; this image exports OTLP over "
                                   "http/protobuf only (port 4318 on a collector or Jaeger)")
            break
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself


def build_propagator(environ: Mapping[str, str]) -> CompositePropagator:
    """OTEL_PROPAGATORS (default b3multi,tracecontext) as one propagator; StartupError for an unknown name."""
    names = [n.strip().lower() for n in environ.get("OTEL_PROPAGATORS", DEFAULT_PROPAGATORS).split(",") if n.strip()]
    unknown = [n for n in names if n not in PROPAGATORS and n != "none"]
    if unknown:
        raise StartupError(f"OTEL_PROPAGATORS: unknown propagator(s) {unknown}; use {sorted(PROPAGATORS)} or none")
    return CompositePropagator([PROPAGATORS[n]() for n in names if n != "none"])


def trace_file_path(template: str, stage: str, version: str) -> Path:
    """STAGE_TRACE_FILE with its placeholders filled in."""
    path = template.replace("{stage}", stage).replace("{version}", version).replace("{pid}", str(os.getpid()))
    return Path(path)


def build_processors(environ: Mapping[str, str], stage: str = "stage", version: str = "0",
                     trace_file: str | None = None) -> list[SpanProcessor]:
    """The span processors the environment asks for; none means tracing is off. StartupError if invalid."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = "otlp" if endpoint else "none"
    processors: list[SpanProcessor] = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name == "otlp":
            processors.append(BatchSpanProcessor(_otlp_exporter(environ)))
        elif name == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            raise StartupError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console or none "
                               f"(and {TRACE_FILE_ENV} for a JSON-lines file)")
    file = (trace_file or "").strip()
    if file:
        delay = None if environ.get("OTEL_BSP_SCHEDULE_DELAY") else FILE_FLUSH_DELAY_MS
        try:
            exporter = JsonLinesSpanExporter(trace_file_path(file, stage, version))
        except OSError as exc:
            raise StartupError(f"{TRACE_FILE_ENV}: cannot open {file} for appending: {exc}") from None
        processors.append(BatchSpanProcessor(exporter, schedule_delay_millis=delay))
    return processors


class ForwardSpan:
    """The CLIENT span of one hop to the next stage (or a no-op stand-in when tracing is off)."""

    def __init__(self, span: Span | None, propagator: TextMapPropagator | None = None) -> None:
        self.span = span
        self.propagator = propagator

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """The headers to send: `incoming` with its trace context replaced by this span's (W3C and B3)."""
        if self.span is None or self.propagator is None:
            return dict(incoming)
        out = {k: v for k, v in incoming.items()
               if k.lower() not in TRACE_HEADERS and not k.lower().startswith(TRACE_HEADER_PREFIX)}
        self.propagator.inject(out, context=trace.set_span_in_context(self.span))
        return out

    def response(self, status_code: int, sent_bytes: int, received_bytes: int) -> None:
        """The next stage's answer: its HTTP status and the bodies' sizes."""
        if self.span is not None:
            self.span.set_attributes({ATTR_STATUS: status_code, ATTR_BODY_IN: sent_bytes,
                                      ATTR_BODY_OUT: received_bytes})


_NO_FORWARD = ForwardSpan(None)


class StageTracing:
    """The tracer of one stage process. Disabled (no provider), every method is a near-free no-op."""

    def __init__(self, provider: TracerProvider | None, attributes: Mapping[str, str | int],
                 propagator: TextMapPropagator | None = None) -> None:
        self.provider = provider
        self.propagator = propagator or build_propagator({})
        self.enabled = provider is not None
        self.attributes = dict(attributes)
        self.tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None

    @classmethod
    def disabled(cls) -> StageTracing:
        return cls(None, {})

    @classmethod
    def from_env(cls, *, pipeline: str, stage: str, version: str, index: int,
                 trace_file: str | None = None) -> StageTracing:
        """Build from `OTEL_*` and the `STAGE_TRACE_FILE` setting; StartupError naming the variable if invalid."""
        processors = build_processors(os.environ, stage, version, trace_file)
        propagator = build_propagator(os.environ)
        if not processors:
            return cls.disabled()
        # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; service.name defaults to the stage.
        resource = Resource.create({SERVICE_VERSION: version, ATTR_PIPELINE: pipeline, ATTR_STAGE: stage})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: stage}))
        length = None if "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT" in os.environ else ATTRIBUTE_LENGTH_LIMIT
        # the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
        provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_attribute_length=length))
        # The limit is ours, so its truncations (a long error message, an exception's stack) are expected: the
        # SDK's warning for each one only filled the stage's log.
        logging.getLogger("opentelemetry.attributes").setLevel(logging.ERROR)
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider, {ATTR_PIPELINE: pipeline, ATTR_STAGE: stage, ATTR_VERSION: version,
                              ATTR_INDEX: index}, propagator)

    @contextlib.contextmanager
    def _span(self, name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None,
              context: Any = None) -> Iterator[Span]:
        assert self.tracer is not None
        with self.tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                               record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                # a CLIENT span keeps the status the next stage answered, not the one this stage maps it to
                record_error(span, exc, status_code=kind is not SpanKind.CLIENT)
                raise

    def server(self, route: str, method: str, path: str,
               headers: Mapping[str, str]) -> contextlib.AbstractContextManager[Span | None]:
        """The SERVER span of one request, continuing the trace its headers carry."""
        if self.tracer is None:
            return _NOOP
        attributes: dict[str, Any] = {**self.attributes, "http.request.method": method, "http.route": route,
                                      "url.path": path}
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id:
            attributes[ATTR_REQUEST_ID] = request_id
        return self._span(f"{method} {route}", SpanKind.SERVER, attributes,
                          self.propagator.extract(headers))

    def span(self, name: str) -> contextlib.AbstractContextManager[Span | None]:
        """An INTERNAL child of the current span: decode, inference, encode."""
        if self.tracer is None:
            return _NOOP
        return self._span(name, SpanKind.INTERNAL)

    @contextlib.contextmanager
    def forward(self, url: str, next_stage: str) -> Iterator[ForwardSpan]:
        """The CLIENT span of the hop to the next stage; `.headers()` carries its context on the wire."""
        if self.tracer is None:
            yield _NO_FORWARD
            return
        with self._span("forward", SpanKind.CLIENT, {"http.request.method": "POST", "url.full": url,
                                                     ATTR_NEXT_STAGE: next_stage}) as span:
            yield ForwardSpan(span, self.propagator)

    def shutdown(self) -> None:
        """Flush and close every exporter (the lifespan's end)."""
        if self.provider is not None:
            self.provider.shutdown()


def annotate(span: Span | None, attributes: Mapping[str, Any]) -> None:
    """Set attributes on a span that is None when tracing is off."""
    if span is not None:
        span.set_attributes(attributes)


def record_error(span: Span, exc: BaseException, status_code: bool = True) -> None:
    """Status ERROR with the message, an `exception` event, and (`status_code`) the HTTP status a StageError
    maps to."""
    message = exc.message if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
    if status_code and isinstance(exc, StageError):
        span.set_attribute(ATTR_STATUS, exc.status_code)
    span.set_attribute(ATTR_ERROR_TYPE, type(exc).__name__)
    span.record_exception(exc, escaped=True)
    span.set_status(Status(StatusCode.ERROR, message[:ATTRIBUTE_LENGTH_LIMIT]))
