"""The hop to the next stage: always binary, one pooled client per process, no retries.

The client is `http1.Http1Client` (this package's own HTTP/1.1 client on asyncio): within a few percent of a
raw socket on loopback where httpx took about twice as long, and it writes the request straight from the
output arrays' buffers (`protocol.encode_request_parts`), with no joined copy of the body.

Retries, outlier detection and mTLS are the mesh's job (Envoy / Istio). Here a failed hop becomes one
error naming the next stage (never its URL: that goes to the log): 502 when it is unreachable or answered
badly, 504 when it is too slow; a 502 or 504 that the next stage itself answered (naming a stage further
down), and a 413 (the request grew past a later stage's limit: the client's to fix), are passed on. A 503
from downstream becomes 502: 503 is what the mesh retries by default, and only the hop next to the failure
should retry it; passed up the chain, every outer hop would retry it again (3 attempts over 4 hops: up to
81 runs of the last stage for one request).
`propagated_headers` picks the headers every hop carries on; with tracing on, the hop's CLIENT span
(`tracing.StageTracing.forward`) replaces their trace context with its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from stage_service.errors import InvalidInput, UpstreamError, UpstreamTimeout
from stage_service.http1 import Http1Client, Http1Error, Http1Response, ProtocolFailed
from stage_service.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, decode_response, encode_request_parts
from stage_service.settings import GATEWAY_HEADER
from stage_service.tracing import StageTracing

log = logging.getLogger("stage_service")
TIMING_HEADER = "x-stage-timing"
# The split a request is pinned to (model_export.manifest.Manifest.split_id), set by the gateway and carried on
# by every hop (it is an `x-pipeline-` header): a stage of another split refuses it.
PIPELINE_VERSION_HEADER = "x-pipeline-version"
PROPAGATED = frozenset({"traceparent", "tracestate", "x-request-id", "b3"})
PROPAGATED_PREFIXES = ("x-b3-", "x-pipeline-")
# 413 is the request's own size (the batch grew past a later stage's limit): the client's to fix, not a 502.
_PASSED_ON = frozenset({413, 502, 504})
# Idle pooled connections are dropped before the next stage would close them (uvicorn: 75 s here).
KEEPALIVE_EXPIRY_S = 30.0


def propagated_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The tracing and pipeline headers of an incoming request that every hop carries on; not the gateway's mark,
    which speaks of the hop into the first stage only."""
    return {k: v for k, v in headers.items()
            if (low := k.lower()) != GATEWAY_HEADER and (low in PROPAGATED or low.startswith(PROPAGATED_PREFIXES))}


def _error_text(response: Http1Response) -> str:
    try:
        data = orjson.loads(response.body)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except orjson.JSONDecodeError:
        pass
    return response.body[:300].decode("utf-8", "replace") or response.reason


class NextStage:
    """Client of the next stage's `/v2/models/<stage>/infer`, shared by all requests of the process.
    `uds`: every connection goes to that Unix domain socket instead of the URL's host and port."""

    def __init__(self, base_url: str, stage_name: str, timeout_s: float, max_connections: int,
                 tracing: StageTracing | None = None, uds: str | None = None) -> None:
        self.base_url = base_url
        self.tracing = tracing or StageTracing.disabled()
        self.stage_name = stage_name
        self.timeout_s = timeout_s
        self.path = f"/v2/models/{stage_name}/infer"
        self.url = f"{base_url}{self.path}"
        self.client = Http1Client(base_url, max_connections=max_connections, keepalive_expiry_s=KEEPALIVE_EXPIRY_S,
                                  uds=uds)

    async def infer(self, tensors: Mapping[str, np.ndarray], request_id: str | None,
                    headers: Mapping[str, str]) -> tuple[dict[str, np.ndarray], str | None, float]:
        """Send the tensors on; return the final outputs, the next stage's timing header and the hop's seconds."""
        body, header_length = encode_request_parts(tensors, request_id)
        where = f"next stage {self.stage_name}"  # error bodies name the stage; its URL goes to the log only
        with self.tracing.forward(self.url, self.stage_name) as hop:
            send_headers = {**hop.headers(headers), HEADER_LENGTH: str(header_length),
                            "content-type": BINARY_CONTENT_TYPE}
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await self._post(body, send_headers)
            except TimeoutError:
                log.warning("%s at %s did not answer within %g s", where, self.url, self.timeout_s)
                raise UpstreamTimeout(f"{where} did not answer within {self.timeout_s:g} s") from None
            except (Http1Error, OSError) as exc:
                log.warning("%s at %s is unreachable: %s: %s", where, self.url, type(exc).__name__, exc)
                raise UpstreamError(f"{where} is unreachable ({type(exc).__name__})") from None
            seconds = time.perf_counter() - start
            hop.response(response.status, sum(memoryview(p).nbytes for p in body), len(response.body))
            if response.status != 200:
                text = _error_text(response)
                status = response.status if response.status in _PASSED_ON else 502
                raise UpstreamError(f"{where} answered {response.status}: {text}", status)
            try:
                _, outputs = decode_response(response.body, response.header(HEADER_LENGTH))
            except InvalidInput as exc:
                raise UpstreamError(f"{where} sent an invalid response: {exc.message}") from None
        return outputs, response.header(TIMING_HEADER), seconds

    async def _post(self, body: Sequence[bytes | memoryview], headers: Mapping[str, str]) -> Http1Response:
        """Sent once more when the connection broke midway: the next stage's replica died while answering, after
        its answer had begun, where Envoy no longer retries (it resets the connection instead). A stage is a pure
        function of its input, so sending the same request again is safe."""
        try:
            return await self.client.post(self.path, body, headers)
        except ProtocolFailed as exc:
            log.warning("next stage %s at %s broke the connection (%s); sending once more", self.stage_name,
                        self.url, exc)
            return await self.client.post(self.path, body, headers)

    async def aclose(self) -> None:
        await self.client.aclose()
