"""`mesh plan`'s model against this machine: the local mesh with 1 and then 2 replicas of the bottleneck stage,
driven closed-loop to saturation, beside what the model (mesh.capacity, mesh.simulate) expects of each.

    python -m benchmarks.capacity_check --pipeline build/by-hand/three [--concurrency 4] [--duration 8]

A benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from loadtest import workload as workloads
from loadtest.report import summarize
from loadtest.runner import LoadSettings, run
from mesh import local
from mesh.capacity import CapacityPlan, StageCapacity, service_times
from mesh.simulate import simulate
from model_export.manifest import load_manifest


def model_of(pipeline: Path, bottleneck: str, replicas: int, cores: int) -> dict[str, float]:
    manifest = load_manifest(pipeline)
    times = service_times(manifest)
    stages = [StageCapacity(n, ms, manifest.profile.threads, replicas if n == bottleneck else 1)
              for n, ms in times.items()]
    plan = CapacityPlan(0.0, 1.0, stages)
    cpu_bound = cores * 1000.0 / sum(ms * manifest.profile.threads for ms in times.values())
    most = min(plan.saturation_rps, cpu_bound)
    return {"max_rps": most, "p50_ms_at_70pct": simulate(plan, 0.7 * most).p50_ms}


def measure(pipeline: Path, bottleneck: str, replicas: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="capacity-check-") as tmp:
        policy = Path(tmp) / "mesh.yaml"
        policy.write_text(yaml.safe_dump({"stages": {bottleneck: {"replicas": replicas}}}))
        state = local.up(pipeline, policy, Path(tmp) / ".mesh", gateway_port=0)
        try:
            manifest = load_manifest(pipeline)
            gateway = local.gateway_credentials(Path(tmp) / ".mesh", state, "benchmarks-capacity")
            work = workloads.build(state.layout.gateway_url, manifest.name,
                                   access=workloads.Access(ca=gateway.ca, token=gateway.token))
            samples = run(work, LoadSettings(concurrency=concurrency, duration_s=duration_s))
            return summarize(samples, duration_s, f"{bottleneck} x{replicas}")
        finally:
            local.down(Path(tmp) / ".mesh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, required=True, help="a pipeline directory split on this machine")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("build/bench-capacity.json"), help="JSON written here")
    args = parser.parse_args()
    manifest = load_manifest(args.pipeline)
    bottleneck = max(manifest.stages, key=lambda s: s.cost.latency_ms).name
    cores = os.cpu_count() or 1
    rows = []
    for replicas in (1, 2):
        measured: dict[str, Any] = measure(args.pipeline, bottleneck, replicas, args.concurrency, args.duration)
        model = model_of(args.pipeline, bottleneck, replicas, cores)
        rows.append({"replicas": replicas, "model": model,
                     "measured": {"throughput_rps": measured["throughput_rps"], "latency_ms": measured["latency_ms"],
                                  "errors": measured["errors"]}})
        print(f"{bottleneck} x{replicas}: model {model['max_rps']:.1f} rps max; measured "
              f"{measured['throughput_rps']:.1f} rps, p50 {measured['latency_ms']['p50']:.2f} ms "
              f"({args.concurrency} clients), errors {measured['errors']}, load average {os.getloadavg()[0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"pipeline": str(args.pipeline), "cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
