"""Replicas per stage from measured costs: the fewest cores that carry a target rate.

A replica of stage i serves one request at a time in `s_i` ms (the latency `split` measured, at batch 1 with
the profile's threads, which are the cores it holds), so it carries at most 1000 / s_i requests per second.
Kept at most `max_utilization` busy (queues grow without bound as a server nears 100%), stage i needs
ceil(R * s_i / 1000 / max_utilization) replicas; the stages are independent, so taking each one's minimum
is the fewest replicas. Each replica then requests only the CPU its share keeps busy (over the same
utilization, in steps of 100 millicores), so a stage 800x cheaper than the bottleneck holds 0.1 core, not 1.
The bottleneck is the stage closest to saturation at R. Within a core budget, the greatest rate is found by
giving each further replica to the current bottleneck.

Requests a stage batches dynamically cost less each than at batch 1, so this errs towards more replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model_export.manifest import Manifest

DEFAULT_MAX_UTILIZATION = 0.7
DEFAULT_BURST = 2.0  # the autoscaler may grow a stage to what this multiple of the target needs


class CapacityError(ValueError):
    """The target cannot be planned: the message says why and what would do."""


@dataclass(frozen=True)
class StageCapacity:
    name: str
    service_ms: float
    threads: int
    replicas: int
    cpu_millicores: int = 0  # the CPU request per replica; 0: all its threads' cores

    @property
    def capacity_rps(self) -> float:
        """The most requests per second its replicas complete, all busy."""
        return self.replicas * 1000.0 / self.service_ms

    @property
    def cores(self) -> float:
        return self.replicas * (self.cpu_millicores or 1000 * self.threads) / 1000

    def utilization(self, rps: float) -> float:
        return rps / self.capacity_rps


@dataclass(frozen=True)
class CapacityPlan:
    target_rps: float
    max_utilization: float
    stages: list[StageCapacity]

    @property
    def cores(self) -> float:
        return sum(s.cores for s in self.stages)

    @property
    def bottleneck(self) -> StageCapacity:
        return min(self.stages, key=lambda s: s.capacity_rps)

    @property
    def saturation_rps(self) -> float:
        """The rate at which the bottleneck is busy all the time."""
        return self.bottleneck.capacity_rps


def service_times(manifest: Manifest) -> dict[str, float]:
    """Each stage's measured latency in ms; CapacityError for a stage without one (not measured by `split`)."""
    unmeasured = [s.name for s in manifest.stages if s.cost.latency_ms <= 0]
    if unmeasured:
        raise CapacityError(f"stages {unmeasured} have no measured latency (cost.latency_ms is 0); split the model "
                            "with `python -m model_export split`, which measures each stage")
    return {s.name: s.cost.latency_ms for s in manifest.stages}


def replicas_for(rps: float, service_ms: float, max_utilization: float) -> int:
    return max(1, math.ceil(rps * service_ms / 1000.0 / max_utilization - 1e-9))


def cpu_request(rps: float, service_ms: float, threads: int, replicas: int, max_utilization: float) -> int:
    """Millicores per replica: the cores its share of `rps` keeps busy, over `max_utilization` (the autoscaler's
    target is a share of the request), in steps of 100, at least 100 and at most all its threads."""
    busy = rps * service_ms / 1000.0 / replicas * threads
    steps = math.ceil(busy / max_utilization * 10 - 1e-9)
    return int(min(threads * 1000, max(100, steps * 100)))


def plan_capacity(manifest: Manifest, target_rps: float, cores: int | None = None,
                  max_utilization: float = DEFAULT_MAX_UTILIZATION) -> CapacityPlan:
    """The replicas per stage that carry `target_rps` with the fewest cores; CapacityError when `cores` is
    too few, saying how many it takes and the most `cores` can carry."""
    if not target_rps > 0:
        raise CapacityError(f"--target-rps must be positive, got {target_rps}")
    if not 0 < max_utilization <= 1:
        raise CapacityError(f"--max-utilization must be in (0, 1], got {max_utilization}")
    threads = manifest.profile.threads
    times = service_times(manifest)
    stages = []
    for name, ms in times.items():
        replicas = replicas_for(target_rps, ms, max_utilization)
        stages.append(StageCapacity(name, ms, threads, replicas,
                                    cpu_request(target_rps, ms, threads, replicas, max_utilization)))
    planned = CapacityPlan(target_rps, max_utilization, stages)
    if cores is not None and planned.cores > cores:
        best = best_within(manifest, cores, max_utilization)
        raise CapacityError(f"{target_rps:g} rps needs {planned.cores:g} cores ({_replica_list(planned)}) at "
                            f"{max_utilization:.0%} utilization; {cores} cores carry at most "
                            f"{best.target_rps:.1f} rps ({_replica_list(best)})")
    return planned


def best_within(manifest: Manifest, cores: int, max_utilization: float = DEFAULT_MAX_UTILIZATION) -> CapacityPlan:
    """The replicas within `cores` that carry the most, and that rate (at `max_utilization`) as its target: one
    replica per stage, then each next one to the bottleneck. With fewer cores than stages (the local mesh on a
    small machine) the replicas share the cores, and the rate is bounded by the work a request needs in all."""
    threads = manifest.profile.threads
    stages = [StageCapacity(name, ms, threads, 1) for name, ms in service_times(manifest).items()]
    while sum(s.cores for s in stages) + threads <= cores:
        low = min(range(len(stages)), key=lambda i: stages[i].capacity_rps)
        s = stages[low]
        stages[low] = StageCapacity(s.name, s.service_ms, s.threads, s.replicas + 1)
    cpu_bound = cores * 1000.0 / sum(s.service_ms * s.threads for s in stages)
    carried = min(CapacityPlan(0.0, max_utilization, stages).saturation_rps, cpu_bound)
    return CapacityPlan(carried * max_utilization, max_utilization, stages)


def _replica_list(plan: CapacityPlan) -> str:
    return ", ".join(f"{s.name} x{s.replicas}" for s in plan.stages)
