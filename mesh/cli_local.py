"""Command-line entry points for the local mesh: up, down, status, logs, apply, demo-request."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from mesh import local, procs
from mesh.v2client import STAGE_TIMING, infer, stage_timing
from model_export.manifest import DATATYPE_TO_NUMPY, ManifestError, load_manifest

console = Console()
err = Console(stderr=True)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=local.DEFAULT_STATE_DIR,
                        help="where the mesh keeps state, certificates, Envoy configs and logs (default: .mesh)")


def register(sub: Any) -> None:
    """Add this side's subcommands to the `python -m mesh` parser."""
    p = sub.add_parser("up", help="start the pipeline locally: stage processes, Envoy sidecars, an Envoy gateway")
    p.add_argument("--pipeline", type=Path, required=True, help="the split pipeline's directory (pipeline.json)")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml traffic policy (default: built-in defaults)")
    p.add_argument("--detach", action="store_true", help="return once ready and leave the mesh running")
    p.add_argument("--gateway-port", type=int, default=None, help="override the policy's gateway port; 0: any free")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every replica to be ready")
    _state_dir(p)
    p.set_defaults(func=_up)

    p = sub.add_parser("down", help="stop everything `up` started")
    _state_dir(p)
    p.set_defaults(func=_down)

    p = sub.add_parser("status", help="every process of the mesh: running, ready, or crashed (exit 1)")
    _state_dir(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("logs", help="logs of one stage's processes (or of the gateway)")
    p.add_argument("stage", help="a stage name, or `gateway`")
    p.add_argument("-n", "--lines", type=int, default=50, help="last N lines of each log (0: all)")
    p.add_argument("--no-sidecars", action="store_true", help="only the stage apps' logs, not their Envoys'")
    _state_dir(p)
    p.set_defaults(func=_logs)

    p = sub.add_parser("apply", help="apply a changed traffic policy to the running mesh, without restarting")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml (default: built-in defaults)")
    _state_dir(p)
    p.set_defaults(func=_apply)

    p = sub.add_parser("demo-request", help="one request through the gateway: top-5 classes and each stage's time")
    p.add_argument("--pipeline", type=Path, default=None, help="default: the running mesh's pipeline")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    _state_dir(p)
    p.set_defaults(func=_demo_request)


def _fail(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return 2


def _table(state: local.State) -> Table:
    table = Table(title=f"pipeline {state.layout.pipeline}: identities spiffe://cluster.local/ns/"
                        f"{state.policy.namespace}/sa/<stage>", title_justify="left")
    for col in ("stage", "version", "weight", "replica", "app", "sidecar in (mTLS)", "sidecar out"):
        table.add_column(col, no_wrap=col == "stage")
    for r in state.layout.replicas:
        stage = state.policy.stages[r.index]
        weight = next(v.weight for v in stage.versions if v.name == r.version)
        table.add_row(r.stage, r.version, f"{weight}%", str(r.replica), str(r.app_port), str(r.inbound_port),
                      str(r.outbound_port or "-"))
    return table


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    # SIGTERM, like Ctrl-C, interrupts from the start: a half-started mesh is stopped by `local.up` itself.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with console.status("starting the mesh (stage processes, sidecars, gateway)..."):
            state = local.up(args.pipeline, args.policy, args.state_dir, args.gateway_port, args.timeout)
    except local.MeshError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; everything started was stopped")
    try:
        console.print(_table(state))
        url = state.layout.gateway_url
        console.print(f"gateway: [bold]{url}[/]  (POST {url}/v2/models/{state.layout.pipeline}/infer)",
                      highlight=False, soft_wrap=True)
        if args.detach:
            console.print(f"running detached; `python -m mesh status` / `down` (state in {args.state_dir})")
            return 0
        _foreground(state)
    except KeyboardInterrupt:
        pass
    # Whatever ends the foreground (Ctrl-C, SIGTERM, even one arriving mid-print), the mesh goes with it;
    # the teardown itself is not interruptible.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stopped = local.down(args.state_dir)
    console.print(f"stopped {len(stopped)} processes")
    return 0


def _foreground(state: local.State) -> None:
    """Stay until Ctrl-C or SIGTERM (both raise KeyboardInterrupt), reporting processes that exit."""
    console.print("Ctrl-C stops the mesh")
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        for p in state.procs:
            if p.name not in reported and not procs.alive(p):
                reported.add(p.name)
                err.print(f"[red]{p.name} (pid {p.pid}) exited[/]; see {p.log}", highlight=False, soft_wrap=True)


def _down(args: argparse.Namespace) -> int:
    try:
        stopped = local.down(args.state_dir)
    except local.MeshError as exc:
        return _fail(str(exc))
    console.print(f"stopped {len(stopped)} processes" if stopped else f"nothing running from {args.state_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        state, rows = local.status(args.state_dir)
    except local.MeshError as exc:
        return _fail(str(exc))
    table = Table(title=f"pipeline {state.layout.pipeline}, gateway {state.layout.gateway_url}")
    for col in ("process", "role", "pid", "state", "log"):
        table.add_column(col, no_wrap=col == "process")
    for row in rows:
        label = ("[green]ready[/]" if row.ready else "[yellow]running, not ready[/]") if row.alive \
            else "[red]crashed or killed[/]"
        table.add_row(row.proc.name, row.proc.role, str(row.proc.pid), label, row.proc.log)
    console.print(table)
    dead = [r.proc.name for r in rows if not r.alive]
    if dead:
        err.print(f"[red]{len(dead)} process(es) not running:[/] {', '.join(dead)}", highlight=False)
        return 1
    return 0


def _logs(args: argparse.Namespace) -> int:
    try:
        files = local.log_files(args.stage, args.state_dir, sidecars=not args.no_sidecars)
    except local.MeshError as exc:
        return _fail(str(exc))
    for f in files:
        console.rule(str(f))
        text = f.read_text(errors="replace") if args.lines == 0 else procs.tail(f, args.lines)
        sys.stdout.write(text + ("\n" if text else ""))
    return 0


def _apply(args: argparse.Namespace) -> int:
    try:
        resolved = local.apply(args.policy, args.state_dir)
    except local.MeshError as exc:
        return _fail(str(exc))
    for s, hop in zip(resolved.stages, resolved.hops, strict=True):
        console.print(f"{s.name}: versions {', '.join(f'{v.name}={v.weight}%' for v in s.versions)}, "
                      f"timeout {hop.route.timeout_s}s, {hop.route.attempts} retries")
    console.print("applied: Envoy reloads its watched configuration files; nothing was restarted")
    return 0


def _demo_request(args: argparse.Namespace) -> int:
    try:
        state = local.read_state(args.state_dir)
        if state is None:
            return _fail(f"no mesh is running from {args.state_dir}; run `python -m mesh up --detach` first")
        manifest = load_manifest(args.pipeline or state.pipeline_dir)
    except (ManifestError, local.MeshError) as exc:
        return _fail(str(exc))
    rng = np.random.default_rng(args.seed)
    inputs = {}
    for t in manifest.inputs:
        shape = [1] + [max(d, 1) for d in t.shape[1:]]
        inputs[t.name] = rng.random(shape).astype(DATATYPE_TO_NUMPY[t.datatype])
    url = state.layout.gateway_url
    try:
        with httpx.Client(timeout=60.0) as client:
            start = time.perf_counter()
            outputs, response = infer(client, url, manifest.name, inputs)
            total_ms = (time.perf_counter() - start) * 1000
    except httpx.HTTPError as exc:
        return _fail(f"request to {url} failed: {exc}")
    console.print(f"POST {url}/v2/models/{manifest.name}/infer (binary, batch 1): {response.status_code}, "
                  f"{total_ms:.1f} ms end to end", highlight=False, soft_wrap=True)
    for name, array in outputs.items():
        scores = array.reshape(array.shape[0], -1)[0]
        top = np.argsort(scores)[::-1][:5]
        console.print(f"top-5 of {name}: " + ", ".join(f"class {i} ({scores[i]:.4f})" for i in top),
                      highlight=False, soft_wrap=True)
    table = Table(title=f"time per stage ({STAGE_TIMING})")
    table.add_column("stage")
    table.add_column("version")
    table.add_column("ms", justify="right")
    for stage, version, ms in stage_timing(response.headers.get(STAGE_TIMING)):
        table.add_row(stage, version, f"{ms:.2f}")
    console.print(table)
    return 0
