"""Prometheus metrics of one stage process, in a registry of its own (so tests can build many apps).

Inference requests are measured by a pure ASGI middleware (status, latency, bytes in and out, in flight);
the routes observe onnxruntime time and the next hop's time.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class StageMetrics:
    """The process's metrics: `stage_*`, following Prometheus naming conventions."""

    def __init__(self, pipeline: str, stage: str, version: str) -> None:
        disable_created_metrics()  # no `_created` series: they double the output and nothing here reads them
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("stage_info", "This process's stage; always 1.", ["pipeline", "stage", "version"],
                          registry=r)
        self.info.labels(pipeline, stage, version).set(1)
        self.ready = Gauge("stage_ready", "1 once warm-up is done and the stage serves.", registry=r)
        self.requests = Counter("stage_requests_total", "Inference requests answered, by HTTP status.", ["code"],
                                registry=r)
        self.duration = Histogram("stage_request_duration_seconds",
                                  "Inference request latency, including the rest of the chain.",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("stage_inference_duration_seconds", "This stage's onnxruntime run time.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("stage_inference_batch_size",
                                    "Samples per onnxruntime run (more than one request's with dynamic batching).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.downstream = Histogram("stage_downstream_duration_seconds",
                                    "Time of the hop to the next stage, its answer included.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("stage_request_bytes_total", "Bytes of inference request bodies received.",
                                registry=r)
        self.bytes_out = Counter("stage_response_bytes_total", "Bytes of inference response bodies sent.",
                                 registry=r)
        self.inflight = Gauge("stage_inflight_requests", "Inference requests in flight.", registry=r)


class InferMetricsMiddleware:
    """Measures every POST `.../infer` request at the ASGI level, whatever the route answers."""

    def __init__(self, app: ASGIApp, metrics: StageMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        m = self.metrics
        status: dict[str, Any] = {"code": 500}
        start = time.perf_counter()

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                m.bytes_in.inc(len(message.get("body", b"")))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                m.bytes_out.inc(len(message.get("body", b"")))
            await send(message)

        m.inflight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            m.inflight.dec()
            m.requests.labels(str(status["code"])).inc()
            m.duration.observe(time.perf_counter() - start)
