"""`python -m benchmarks.cpu_share`: where a request's CPU goes in the local mesh.

The pipeline comes up behind the local Envoy mesh (`suite.running_mesh`, tracing off), a closed loop of binary
requests runs through its gateway, and every process's CPU time (user + system, from /proc/<pid>/stat) over
the loop is divided by the requests answered: each stage's app, each Envoy (gateway and sidecars) and this
process, the load generator. On a machine of N cores their sum bounds the throughput at N s of CPU per second;
at concurrency 1 it is the latency's CPU part. A table of milliseconds per request, also as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from benchmarks.sections import update_section
from benchmarks.suite import running_mesh
from loadtest.machine import describe
from loadtest.runner import LoadSettings, closed_loop
from loadtest.workload import build
from model_export.manifest import load_manifest

LOAD_GENERATOR = "load generator (this process)"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of proc(5)


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def per_request_ms(before: Mapping[str, float], after: Mapping[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each process, from two snapshots of CPU seconds."""
    if requests <= 0:
        raise ValueError("no request was answered: nothing to divide the CPU time by")
    return {name: (after[name] - before[name]) * 1000 / requests for name in after}


def measure(pipeline: Path, policy: Path | None, concurrencies: list[int], seconds: float) -> list[dict[str, object]]:
    """One result per concurrency, one after the other on the same running mesh."""
    manifest = load_manifest(pipeline)
    results: list[dict[str, object]] = []
    with running_mesh(pipeline, policy) as (state, access):
        roles = {p.name: p.role for p in state.procs} | {LOAD_GENERATOR: "load generator"}

        def snapshot() -> dict[str, float]:
            return {**{p.name: cpu_seconds(p.pid) for p in state.procs}, LOAD_GENERATOR: own_cpu_seconds()}

        workload = build(state.layout.gateway_url, manifest.name, binary=True, access=access)
        for concurrency in concurrencies:
            settings = LoadSettings(concurrency=concurrency, duration_s=seconds, timeout_s=60)
            asyncio.run(closed_loop(workload, replace(settings, duration_s=2.0)))  # warm connections and caches
            before, start = snapshot(), time.perf_counter()
            samples = asyncio.run(closed_loop(workload, settings))
            after, elapsed = snapshot(), time.perf_counter() - start
            answered = sum(1 for s in samples if s.status == "200")
            results.append({"pipeline": manifest.name, "concurrency": concurrency, "answered": answered,
                            "requests_per_s": answered / elapsed, "failed": len(samples) - answered,
                            "cpu_ms_per_request": per_request_ms(before, after, answered), "roles": roles})
    return results


def by_role(shares: Mapping[str, float], roles: Mapping[str, str]) -> dict[str, float]:
    """The CPU milliseconds per request summed per role: app, sidecar, gateway, load generator."""
    totals: dict[str, float] = {}
    for name, ms in shares.items():
        totals[roles[name]] = totals.get(roles[name], 0.0) + ms
    return totals


def markdown(result: Mapping[str, object]) -> list[str]:
    shares, roles = result["cpu_ms_per_request"], result["roles"]
    assert isinstance(shares, dict) and isinstance(roles, dict)
    total, cores = sum(shares.values()), os.cpu_count() or 1
    out = [f"{result['pipeline']}, concurrency {result['concurrency']}: {result['answered']} answered "
           f"({result['requests_per_s']:.1f}/s), {result['failed']} not", "",
           "| process | CPU ms per request | share |", "|---|---|---|"]
    out += [f"| {name} | {ms:.2f} | {ms / total:.0%} |" for name, ms in sorted(shares.items())]
    out += [f"| all | {total:.2f} | 100% |", "",
            "By role: " + ", ".join(f"{role} {ms:.2f} ms ({ms / total:.0%})"
                                    for role, ms in sorted(by_role(shares, roles).items())) + ".",
            f"{cores} cores give at most {cores * 1000 / total:.1f} requests/s at this CPU cost."]
    return out


def section(results: list[dict[str, object]]) -> str:
    """The bench-cpu section of BENCHMARKS.md."""
    out = ["## CPU per request, by process (make bench-cpu)", "",
           f"Measured by `make bench-cpu` (`python -m benchmarks.cpu_share`) on {describe()}, "
           f"{time.strftime('%Y-%m-%d')}. {(__doc__ or '').split(chr(10), 2)[2].strip()}", ""]
    for result in results:
        out += [*markdown(result), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_share",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=Path("build/reference"))
    parser.add_argument("--policy", type=Path, default=None, help="a mesh.yaml (default: the built-in policy)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--benchmarks", type=Path, default=None,
                        help="also write them as the bench-cpu section of this file (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.seconds <= 0:
        print("--concurrency must be at least 1 and --seconds above 0", file=sys.stderr)
        return 2
    results = measure(args.pipeline, args.policy, args.concurrency, args.seconds)
    text = section(results)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.benchmarks is not None:
        update_section(args.benchmarks, "bench-cpu", text)
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
