"""A small discrete-event model of the chain: Poisson arrivals at a rate, each stage a pool of replicas with
one first-come-first-served queue (Envoy's least-request balancing comes close to one shared queue), each
request served in the stage's measured time. Hops cost nothing here: the model is of the stages alone.

Each stage is simulated in the order requests reach it: a request starts on the replica that frees first,
no earlier than it arrives, and leaves at start + service time; the order in which requests leave one stage
is the order they reach the next. For first-come-first-served identical servers that is exact.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from mesh.capacity import CapacityPlan

DEFAULT_REQUESTS = 20_000
WARMUP_SHARE = 0.1  # the first requests see empty queues; they are left out of the numbers


@dataclass(frozen=True)
class SimResult:
    offered_rps: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    requests: int


def run_stage(arrivals: np.ndarray, replicas: int, service_ms: float) -> np.ndarray:
    """Departure times (ms) of requests arriving at `arrivals` (sorted), in the same order."""
    free = [0.0] * replicas
    departures = np.empty_like(arrivals)
    for k, t in enumerate(arrivals):
        start = max(t, heapq.heappop(free))
        departures[k] = start + service_ms
        heapq.heappush(free, departures[k])
    return departures


def simulate(plan: CapacityPlan, rps: float, requests: int = DEFAULT_REQUESTS, seed: int = 0) -> SimResult:
    """Offer `rps` to the chain `plan` describes; the rate it completes and its end-to-end latency."""
    rng = np.random.default_rng(seed)
    start = np.cumsum(rng.exponential(1000.0 / rps, requests))
    times = start
    order = np.arange(requests)
    for stage in plan.stages:
        done = run_stage(times, stage.replicas, stage.service_ms)
        by_departure = np.argsort(done, kind="stable")
        times, order = done[by_departure], order[by_departure]
    finished = np.empty(requests)
    finished[order] = times
    keep = slice(int(requests * WARMUP_SHARE), None)
    latency = finished[keep] - start[keep]
    span_ms = finished[keep].max() - finished[keep].min()  # completions per unit time, as a load test counts them
    return SimResult(rps, latency.size * 1000.0 / span_ms, float(np.percentile(latency, 50)),
                     float(np.percentile(latency, 99)), requests)
