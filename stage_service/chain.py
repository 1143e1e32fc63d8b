"""The hop to the next stage: always binary, one pooled client per process, no retries.

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
from collections.abc import Mapping

import httpx
import numpy as np

from stage_service.errors import InvalidInput, UpstreamError, UpstreamTimeout
from stage_service.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, decode_response, encode_request
from stage_service.tracing import StageTracing

log = logging.getLogger("stage_service")
TIMING_HEADER = "x-stage-timing"
PROPAGATED = frozenset({"traceparent", "tracestate", "x-request-id", "b3"})
PROPAGATED_PREFIXES = ("x-b3-", "x-pipeline-")
# 413 is the request's own size (the batch grew past a later stage's limit): the client's to fix, not a 502.
_PASSED_ON = frozenset({413, 502, 504})
# Idle pooled connections are dropped before the next stage would close them (uvicorn: 75 s here).
KEEPALIVE_EXPIRY_S = 30.0


def propagated_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The tracing and pipeline headers of an incoming request that every hop carries on."""
    return {k: v for k, v in headers.items() if k.lower() in PROPAGATED or k.lower().startswith(PROPAGATED_PREFIXES)}


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return response.text[:300] or response.reason_phrase


class NextStage:
    """Client of the next stage's `/v2/models/<stage>/infer`, shared by all requests of the process."""

    def __init__(self, base_url: str, stage_name: str, timeout_s: float, max_connections: int,
                 tracing: StageTracing | None = None) -> None:
        self.base_url = base_url
        self.tracing = tracing or StageTracing.disabled()
        self.stage_name = stage_name
        self.timeout_s = timeout_s
        self.url = f"{base_url}/v2/models/{stage_name}/infer"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    async def infer(self, tensors: Mapping[str, np.ndarray], request_id: str | None,
                    headers: Mapping[str, str]) -> tuple[dict[str, np.ndarray], str | None, float]:
        """Send the tensors on; return the final outputs, the next stage's timing header and the hop's seconds."""
        body, header_length = encode_request(tensors, request_id)
        where = f"next stage {self.stage_name}"  # error bodies name the stage; its URL goes to the log only
        with self.tracing.forward(self.url, self.stage_name) as hop:
            send_headers = {**hop.headers(headers), HEADER_LENGTH: str(header_length),
                            "content-type": BINARY_CONTENT_TYPE}
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await self.client.post(self.url, content=body, headers=send_headers)
            except (TimeoutError, httpx.TimeoutException):
                log.warning("%s at %s did not answer within %g s", where, self.url, self.timeout_s)
                raise UpstreamTimeout(f"{where} did not answer within {self.timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                log.warning("%s at %s is unreachable: %s: %s", where, self.url, type(exc).__name__, exc)
                raise UpstreamError(f"{where} is unreachable ({type(exc).__name__})") from None
            seconds = time.perf_counter() - start
            hop.response(response.status_code, len(body), len(response.content))
            if response.status_code != 200:
                text = _error_text(response)
                status = response.status_code if response.status_code in _PASSED_ON else 502
                raise UpstreamError(f"{where} answered {response.status_code}: {text}", status)
            try:
                _, outputs = decode_response(response.content, response.headers.get(HEADER_LENGTH))
            except InvalidInput as exc:
                raise UpstreamError(f"{where} sent an invalid response: {exc.message}") from None
        return outputs, response.headers.get(TIMING_HEADER), seconds

    async def aclose(self) -> None:
        await self.client.aclose()
