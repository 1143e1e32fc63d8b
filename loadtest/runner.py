"""Open-loop and closed-loop load, bounded in count and time.

Open loop sends request i at t0 + i/rate whatever happened before, and measures its latency from that
intended time: a server stall shows up as the latency of every request scheduled during it, instead of
being hidden by a client that waited (coordinated omission). Closed loop runs C clients back to back,
like perf_analyzer's concurrency mode, for sweeping to saturation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from loadtest.workload import Workload
from stage_service.protocol import HEADER_LENGTH

# What the client itself reports instead of an HTTP status.
TIMEOUT, CONNECT_ERROR, DROPPED, WRONG = "timeout", "connect-error", "dropped", "wrong-output"


@dataclass(frozen=True)
class Sample:
    intended_s: float  # intended send time, seconds after the run started
    latency_s: float  # completion minus intended send time
    status: str  # "200", "503", ..., or one of the client-side outcomes above
    max_abs_diff: float | None = None  # for sampled responses


@dataclass(frozen=True)
class LoadSettings:
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 10.0
    timeout_s: float = 30.0
    max_requests: int = 100_000
    max_outstanding: int = 512
    check_fraction: float = 0.0
    tolerance: float = 1e-5
    seed: int = 0


Progress = Callable[[int], None]


class _Sender:
    def __init__(self, workload: Workload, settings: LoadSettings, client: httpx.AsyncClient, t0: float) -> None:
        self.workload, self.settings, self.client, self.t0 = workload, settings, client, t0
        self.rng = random.Random(settings.seed)
        self.samples: list[Sample] = []

    async def send(self, i: int, intended: float) -> None:
        body = self.workload.bodies[i % len(self.workload.bodies)]
        check = self.rng.random() < self.settings.check_fraction
        diff = None
        try:
            response = await self.client.post(self.workload.infer_url, content=body.content, headers=body.headers)
            status = str(response.status_code)
            if check and response.status_code == 200:
                diff = self.workload.check(body, response.content, response.headers.get(HEADER_LENGTH),
                                           self.settings.tolerance)
                if diff is not None and diff > self.settings.tolerance:
                    status = WRONG
        except httpx.TimeoutException:
            status = TIMEOUT
        except httpx.TransportError:
            status = CONNECT_ERROR
        done = time.perf_counter() - self.t0
        self.samples.append(Sample(intended, done - intended, status, diff))


def _client(workload: Workload, settings: LoadSettings, connections: int,
            transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=settings.timeout_s, transport=transport,
                             verify=workload.access.verify(), headers=workload.access.headers)


async def open_loop(workload: Workload, settings: LoadSettings, progress: Progress | None = None,
                    transport: httpx.AsyncBaseTransport | None = None) -> list[Sample]:
    assert settings.rate is not None and settings.rate > 0
    total = min(int(settings.rate * settings.duration_s), settings.max_requests)
    async with _client(workload, settings, settings.max_outstanding, transport) as client:
        t0 = time.perf_counter()
        sender = _Sender(workload, settings, client, t0)
        pending: set[asyncio.Task[None]] = set()
        for i in range(total):
            intended = i / settings.rate
            delay = t0 + intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= settings.max_outstanding:
                # never wait for the server: a request that cannot go out on time is a failure, not a pause
                sender.samples.append(Sample(intended, 0.0, DROPPED))
            else:
                task = asyncio.create_task(sender.send(i, intended))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if progress:
                progress(1)
        if pending:
            await asyncio.wait(pending, timeout=settings.timeout_s + 5)
    return sorted(sender.samples, key=lambda s: s.intended_s)


async def closed_loop(workload: Workload, settings: LoadSettings, progress: Progress | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> list[Sample]:
    assert settings.concurrency is not None and settings.concurrency > 0
    async with _client(workload, settings, settings.concurrency, transport) as client:
        t0 = time.perf_counter()
        sender = _Sender(workload, settings, client, t0)
        counter = iter(range(settings.max_requests))

        async def worker() -> None:
            while time.perf_counter() - t0 < settings.duration_s:
                i = next(counter, None)
                if i is None:
                    return
                await sender.send(i, time.perf_counter() - t0)
                if progress:
                    progress(1)

        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
    return sorted(sender.samples, key=lambda s: s.intended_s)


def run(workload: Workload, settings: LoadSettings, progress: Progress | None = None) -> list[Sample]:
    if (settings.rate is None) == (settings.concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    loop = open_loop if settings.rate is not None else closed_loop
    return asyncio.run(loop(workload, settings, progress))
