"""Closed-loop load over the KServe v2 gRPC protocol: `ModelInfer` with the tensors as `raw_input_contents`, C
clients back to back on one channel for a bounded time. Samples are the HTTP runner's (`runner.Sample`), a
gRPC status other than OK reported by its name, so `report.summarize` reads both alike. Used by the peers
benchmark's gRPC rows, where every server (ours, KServe's, MLServer's) speaks the same protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import grpc
import numpy as np

from loadtest.runner import TIMEOUT, WRONG, Sample
from stage_service import kserve_grpc, protocol

MAX_MESSAGE_BYTES = 256 << 20
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def infer_request(model: str, tensors: Mapping[str, np.ndarray]) -> object:
    """One `ModelInferRequest` carrying `tensors` as raw contents, in order."""
    request = kserve_grpc.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        request.inputs.add(name=name, datatype=protocol.datatype_of(array), shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


async def _ready(channel: grpc.aio.Channel, model: str, timeout_s: float) -> None:
    ready = channel.unary_unary(f"/{kserve_grpc.SERVICE}/ModelReady",
                                request_serializer=kserve_grpc.ModelReadyRequest.SerializeToString,
                                response_deserializer=kserve_grpc.ModelReadyResponse.FromString)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await ready(kserve_grpc.ModelReadyRequest(name=model), timeout=5)).ready:
                return
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gRPC ModelReady for {model}: {exc.code().name}: {exc.details()}") from None
        await asyncio.sleep(0.2)


async def closed_loop(target: str, model: str, tensors: Mapping[str, np.ndarray], concurrency: int,
                      duration_s: float, timeout_s: float = 60.0) -> list[Sample]:
    """`concurrency` clients sending the same request back to back for `duration_s` seconds."""
    request = infer_request(model, tensors)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        await _ready(channel, model, timeout_s)
        infer = channel.unary_unary(f"/{kserve_grpc.SERVICE}/ModelInfer",
                                    request_serializer=kserve_grpc.ModelInferRequest.SerializeToString,
                                    response_deserializer=kserve_grpc.ModelInferResponse.FromString)
        samples: list[Sample] = []
        t0 = time.perf_counter()
        stop = t0 + duration_s

        async def client() -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    response = await infer(request, timeout=timeout_s)
                    status = "200" if len(response.raw_output_contents) == len(response.outputs) else WRONG
                except grpc.aio.AioRpcError as exc:
                    status = TIMEOUT if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else exc.code().name
                samples.append(Sample(start - t0, time.perf_counter() - start, status))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def run(target: str, model: str, tensors: Mapping[str, np.ndarray], concurrency: int, duration_s: float,
        timeout_s: float = 60.0) -> list[Sample]:
    return asyncio.run(closed_loop(target, model, tensors, concurrency, duration_s, timeout_s))
