"""`python -m mesh plan`: replicas per stage from measured costs, for a target rate, written as a mesh.yaml;
a simulation of the plan at the target and at 10x and 100x what this machine's cores carry."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from mesh.capacity import (
    DEFAULT_BURST,
    DEFAULT_MAX_UTILIZATION,
    CapacityError,
    CapacityPlan,
    best_within,
    plan_capacity,
    replicas_for,
)
from mesh.plan import resolve
from mesh.policy import Policy, PolicyError, load_policy
from mesh.simulate import simulate
from model_export.cli_help import compact_table, console_width
from model_export.manifest import Manifest, ManifestError, load_manifest

console = Console(width=console_width(sys.stdout))
err = Console(stderr=True, width=console_width(sys.stderr))
MAX_POLICY_REPLICAS = 64  # mesh.policy.StagePolicy.replicas and Autoscale.min_replicas
MAX_POLICY_AUTOSCALE = 256  # mesh.policy.Autoscale.max_replicas


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="replicas per stage from measured costs for a target rate, as a mesh.yaml")
    p.add_argument("--pipeline", required=True, type=Path, help="directory holding pipeline.json (its measured costs)")
    p.add_argument("--target-rps", required=True, type=float, help="requests per second to carry")
    p.add_argument("--cores", type=int, default=None,
                   help="cores available: the plan must fit them (default: this machine's count, for the "
                        "simulated 10x and 100x only)")
    p.add_argument("--max-utilization", type=float, default=DEFAULT_MAX_UTILIZATION,
                   help="the share of time a replica may be busy at the target rate")
    p.add_argument("--burst", type=float, default=DEFAULT_BURST,
                   help="the autoscaler's maximum replicas carry this multiple of the target rate")
    p.add_argument("--base", type=Path, default=None, help="a mesh.yaml to add the planned stages to (its comments "
                                                           "are not kept); default: a policy of only these stages")
    p.add_argument("--out", type=Path, default=None, help="the mesh.yaml to write (default: print it)")
    p.set_defaults(func=_plan)


def stage_blocks(plan: CapacityPlan, burst: float) -> dict[str, dict[str, Any]]:
    """Per stage: replicas, threads, the autoscaler's range and target, CPU from the measured threads."""
    blocks = {}
    for s in plan.stages:
        if s.replicas > MAX_POLICY_REPLICAS:
            raise CapacityError(f"{s.name} needs {s.replicas} replicas, more than a policy allows "
                                f"({MAX_POLICY_REPLICAS}); lower --target-rps or split the stage further")
        most = min(MAX_POLICY_AUTOSCALE, max(s.replicas, replicas_for(plan.target_rps * burst, s.service_ms,
                                                                      plan.max_utilization)))
        blocks[s.name] = {"replicas": s.replicas, "threads": s.threads,
                          "autoscale": {"min_replicas": s.replicas, "max_replicas": most,
                                        "target_cpu_percent": round(plan.max_utilization * 100)},
                          "resources": {"cpu_millicores": s.cpu_millicores or 1000 * s.threads}}
    return blocks


def planned_policy(plan: CapacityPlan, manifest: Manifest, base: Path | None, burst: float) -> dict[str, Any]:
    """The policy document: `base` (or nothing) with each stage's block replaced by the planned one where
    planned; validated and resolved against the manifest before it is returned."""
    data: dict[str, Any] = {}
    if base is not None:
        load_policy(base)  # one clear message for a bad base
        data = yaml.safe_load(base.read_text()) or {}
    stages = data.setdefault("stages", {}) or {}
    for name, block in stage_blocks(plan, burst).items():
        stages[name] = {**(stages.get(name) or {}), **block}
    data["stages"] = stages
    resolve(Policy.model_validate(data), manifest)
    return data


def header(plan: CapacityPlan, manifest: Manifest, base: Path | None, burst: float) -> str:
    """Says how the file was made, as the command that makes it again (`--pipeline` and `--out` aside)."""
    command = (f"python -m mesh plan --target-rps {plan.target_rps:g} --max-utilization {plan.max_utilization:g} "
               f"--burst {burst:g}" + (f" --base {base}" if base is not None else ""))
    return (f"# Written by `{command}` from the costs measured in "
            f"{manifest.name}'s pipeline.json\n# ({manifest.profile.threads} thread(s), batch "
            f"{manifest.profile.batch}): replicas for {plan.target_rps:g} rps at most "
            f"{plan.max_utilization:.0%} busy; bottleneck {plan.bottleneck.name}.\n")


def _table(plan: CapacityPlan) -> None:
    table = compact_table("stage", "ms/req", "replicas", "cpu each", "max rps", "busy",
                          right=("ms/req", "replicas", "cpu each", "max rps", "busy"))
    for s in plan.stages:
        table.add_row(s.name, f"{s.service_ms:.3f}", str(s.replicas), f"{s.cpu_millicores}m", f"{s.capacity_rps:,.0f}",
                      f"{s.utilization(plan.target_rps):.0%}")
    console.print(table)


def _simulations(manifest: Manifest, plan: CapacityPlan, machine_cores: int, utilization: float) -> None:
    machine = best_within(manifest, machine_cores, utilization)
    rows = [("target", plan)]
    for factor in (10, 100):
        rows.append((f"{factor}x machine", plan_capacity(manifest, machine.target_rps * factor, None, utilization)))
    console.print(f"this machine ({machine_cores} cores) carries {machine.target_rps:.1f} rps at "
                  f"{utilization:.0%} busy; simulated (Poisson arrivals, measured service times, no hop costs):",
                  highlight=False, soft_wrap=True)
    table = compact_table("load", "rps", "cores", "done rps", "p50 ms", "p99 ms",
                          right=("rps", "cores", "done rps", "p50 ms", "p99 ms"))
    for label, p in rows:
        r = simulate(p, p.target_rps)
        table.add_row(label, f"{p.target_rps:,.1f}", f"{p.cores:g}", f"{r.throughput_rps:,.1f}", f"{r.p50_ms:.2f}",
                      f"{r.p99_ms:.2f}")
    console.print(table)


def _plan(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.pipeline)
        plan = plan_capacity(manifest, args.target_rps, args.cores, args.max_utilization)
        document = planned_policy(plan, manifest, args.base, args.burst)
        machine_cores = args.cores or os.cpu_count() or 1
        expected = simulate(plan, plan.target_rps)
    except (ManifestError, PolicyError, CapacityError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"{manifest.name}: {plan.target_rps:g} rps with {plan.cores:g} cores; bottleneck "
                  f"{plan.bottleneck.name} ({plan.bottleneck.utilization(plan.target_rps):.0%} busy); expected p50 "
                  f"{expected.p50_ms:.2f} ms (simulated)", highlight=False, soft_wrap=True)
    _table(plan)
    _simulations(manifest, plan, machine_cores, args.max_utilization)
    text = header(plan, manifest, args.base, args.burst) + yaml.safe_dump(document, sort_keys=False)
    if args.out is None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    console.print(f"wrote {args.out}; `python -m mesh render --policy {args.out}` gives its prod overlay",
                  highlight=False, soft_wrap=True)
    return 0
