"""Command-line entry points for the local mesh: up, token, down, status, logs, apply, demo-request."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mesh import cli_split, gateway_auth, local, procs, records_view, state_dir
from mesh.records import read_records
from mesh.v2client import STAGE_TIMING, infer, stage_timing
from model_export.cli_help import compact_table, console_width, fits
from model_export.manifest import DATATYPE_TO_NUMPY, Manifest, ManifestError, load_manifest

console = Console(width=console_width(sys.stdout))
err = Console(stderr=True, width=console_width(sys.stderr))

MAX_TOKEN_LIFETIME_S = 30 * 24 * 3600.0  # the mesh's CA and certificates last 30 days (mesh.pki.VALIDITY)
STATE_DIR_HELP = ("the mesh's state directory (default: the nearest .mesh/ from here upwards that holds a "
                  "mesh, else the one the last `up` recorded in " + str(state_dir.record_file()) + ")")


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: Any) -> None:
    """Add this side's subcommands to the `python -m mesh` parser."""
    p = sub.add_parser("up", help="start the pipeline locally: stage processes, Envoy sidecars, an Envoy gateway")
    p.add_argument("--pipeline", type=Path, required=True,
                   help="the pipeline directory written by `python -m model_export split` (pipeline.json)")
    p.add_argument("--policy", type=Path, default=None, help="mesh.yaml traffic policy (default: built-in defaults)")
    p.add_argument("--detach", action="store_true", help="return once ready and leave the mesh running")
    p.add_argument("--no-restart", action="store_true",
                   help="start no keeper: a process of the mesh that exits stays down (default: started again, "
                        "with a back-off while it keeps exiting, as kubelet does)")
    p.add_argument("--gateway-port", type=int, default=None,
                   help="override the policy's gateway.port (default: the policy's, 8080); 0: any free port")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every replica to be ready")
    p.add_argument("--insecure-gateway", action="store_true",
                   help="serve plain HTTP at the gateway instead of TLS with a certificate from the mesh's CA "
                        "(demos only; a token is still required unless mesh.yaml turns gateway.auth off)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where to keep state, certificates, Envoy configs and logs (default: the nearest .mesh/ "
                        "from here upwards, else ./.mesh); recorded so other commands find it from anywhere")
    _json(p)
    p.set_defaults(func=_up)

    p = sub.add_parser("token", help="print a token the running mesh's gateway accepts (Authorization: Bearer ...)")
    p.add_argument("--subject", required=True, help="the token's subject (`sub`): who the client is")
    p.add_argument("--expires-in", type=float, default=gateway_auth.DEFAULT_EXPIRES_IN_S,
                   help="seconds the token is valid for")
    _state_dir(p)
    p.set_defaults(func=_token)

    p = sub.add_parser("down", help="stop everything `up` started (logs stay for `mesh logs`)")
    _state_dir(p)
    p.set_defaults(func=_down)

    p = sub.add_parser("status", help="every process of the mesh: running, ready, or crashed (exit 1 if any is not "
                                      "ready); every endpoint's discovery record as the callers' Envoys see it")
    _state_dir(p)
    _json(p)
    p.add_argument("--watch", action="store_true",
                   help="refresh the discovery records until Ctrl-C (with --json: one JSON object per line)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=_status)

    p = sub.add_parser("logs", help="logs of a stage's processes, of one process, or of the gateway; "
                                    "after `down`, of the last mesh")
    p.add_argument("name", help="a stage (all its replicas and sidecars), `gateway`, or a process as `status` "
                                "lists it (e.g. reference-stage-1-v1-0)")
    p.add_argument("-n", "--lines", type=int, default=50, help="last N lines of each log (0: all)")
    p.add_argument("--no-sidecars", action="store_true", help="only the stage apps' logs, not their Envoys'")
    _state_dir(p)
    p.set_defaults(func=_logs)

    p = sub.add_parser("keep", help="start the running mesh's keeper again (after it was killed, or on a mesh "
                                    "started with --no-restart): what exits is then started again")
    _state_dir(p)
    p.set_defaults(func=_keep)

    p = sub.add_parser("apply", help="apply a changed traffic policy to the running mesh, without restarting")
    p.add_argument("--policy", type=Path, default=None,
                   help="mesh.yaml (default: the file `up` used, re-read; the built-in defaults if it used none)")
    _state_dir(p)
    p.set_defaults(func=_apply)

    p = sub.add_parser("demo-request", help="one request through the gateway: top-5 classes and each stage's time")
    p.add_argument("--url", default=None,
                   help="the gateway's base URL, e.g. a port-forwarded Istio ingress gateway (default: the "
                        "running local mesh's gateway)")
    p.add_argument("--host", default=None,
                   help="Host header and TLS server name, for a gateway that routes by host (the policy's "
                        "gateway.host, e.g. pipeline.local, on the cluster) (default: the URL's host)")
    p.add_argument("--token", default=None,
                   help="sent as `Authorization: Bearer TOKEN` (default: with --url none; else a token the running "
                        "mesh's gateway accepts, as `python -m mesh token` mints)")
    p.add_argument("--cacert", type=Path, default=None,
                   help="with --url: the CA to check the gateway's certificate against (default: the system's)")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="the pipeline directory, for its input shapes and name (default: the running mesh's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    _state_dir(p)
    _json(p)
    p.set_defaults(func=_demo_request)


def _fail(message: str) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 2


def _found(args: argparse.Namespace) -> Path:
    return state_dir.find(args.state_dir)


def _not_found(args: argparse.Namespace, what: str) -> str:
    where = str(args.state_dir) if args.state_dir is not None else state_dir.searched()
    return f"{what} ({where}); start one with `python -m mesh up --pipeline DIR --detach`, or pass --state-dir"


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=1))


def _replicas(state: local.State) -> list[dict[str, object]]:
    rows = []
    for r in state.layout.replicas:
        stage = state.policy.stages[r.index]
        weight = next(v.weight for v in stage.versions if v.name == r.version)
        rows.append({"name": r.name, "stage": r.stage, "version": r.version, "weight": weight,
                     "inbound_port": r.inbound_port, "app_socket": r.app_socket, "outbound_socket": r.outbound_socket,
                     "admin_socket": r.admin_socket})
    return rows


def _table(state: local.State) -> Table:
    """Per replica its mTLS port, the only way in; its app and outbound listener are sockets in the private
    socket directory (named here; the full paths in --json)."""
    table = compact_table("replica", "weight", "in (mTLS)", "app", "out", right=("weight", "in (mTLS)"))
    for r, row in zip(state.layout.replicas, _replicas(state), strict=True):
        table.add_row(str(row["name"]), f"{row['weight']}%", str(row["inbound_port"]), Path(r.app_socket).name,
                      Path(r.outbound_socket).name if r.outbound_socket else "-")
    return table


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    where = state_dir.for_up(args.state_dir)
    # SIGTERM, like Ctrl-C, interrupts from the start: a half-started mesh is stopped by `local.up` itself.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with err.status("starting the mesh (stage processes, sidecars, gateway)..."):
            state = local.up(args.pipeline, args.policy, where, args.gateway_port, args.timeout,
                             insecure_gateway=args.insecure_gateway, restart=not args.no_restart)
    except local.MeshError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; everything started was stopped")
    state_dir.record(where)
    try:
        url = state.layout.gateway_url
        ca = _gateway_ca(state, where)
        if args.json:
            _print_json({"pipeline": state.layout.pipeline, "gateway_url": url,
                         "gateway_grpc": state.layout.gateway_grpc_address, "gateway_ca": str(ca) if ca else None,
                         "gateway_auth": state.policy.gateway.auth.enabled, "state_dir": str(where.resolve()),
                         "socket_dir": state.layout.socket_dir, "namespace": state.policy.namespace,
                         "replicas": _replicas(state)})
        else:
            console.print(f"pipeline {state.layout.pipeline}: identities "
                          f"spiffe://cluster.local/ns/{state.policy.namespace}/sa/<stage>", highlight=False)
            console.print(_table(state))
            console.print(f"sockets (mode 0700, only this user): {state.layout.socket_dir}", highlight=False,
                          soft_wrap=True)
            console.print(f"gateway: [bold]{url}[/]  (POST {url}/v2/models/{state.layout.pipeline}/infer)",
                          highlight=False, soft_wrap=True)
            console.print(_client_hint(state, ca), highlight=False, soft_wrap=True)
        if args.detach:
            (err if args.json else console).print(
                f"running detached; `python -m mesh status` / `down` find it from any directory (state in {where})",
                highlight=False, soft_wrap=True)
            return 0
        _foreground(where)
    except KeyboardInterrupt:
        pass
    # Whatever ends the foreground (Ctrl-C, SIGTERM, even one arriving mid-print), the mesh goes with it;
    # the teardown itself is not interruptible.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stopped = local.down(where)
    err.print(f"stopped {len(stopped)} processes")
    return 0


def _gateway_ca(state: local.State, where: Path) -> Path | None:
    """The CA clients check the gateway's certificate against; None where it serves plain HTTP."""
    return where.resolve() / "pki" / "ca.pem" if state.layout.gateway_tls else None


def _client_hint(state: local.State, ca: Path | None) -> str:
    """What a client needs besides the URL: the CA, and a token where the gateway asks for one."""
    needs = [f"the CA {ca}" if ca else "nothing for TLS (--insecure-gateway: plain HTTP)"]
    if state.policy.gateway.auth.enabled:
        needs.append("a token: `python -m mesh token --subject NAME` (Authorization: Bearer ...)")
    return "clients need " + " and ".join(needs)


def _foreground(where: Path) -> None:
    """Stay until Ctrl-C or SIGTERM (both raise KeyboardInterrupt), reporting processes that exit and start
    again (the keeper's restarts)."""
    err.print("Ctrl-C stops the mesh")
    reported: dict[str, int] = {}  # name -> the pid reported gone
    known: dict[str, int] = {}  # name -> its pid last seen
    while (state := local.read_state(where)) is not None:
        keeper = local.running_keeper(state) is not None
        for p in state.procs:
            old = known.setdefault(p.name, p.pid)
            if old != p.pid:  # the keeper started it again, maybe between two of these readings
                known[p.name] = p.pid
                gone = "" if reported.get(p.name) == old else f"{p.name} (pid {old}) exited; "
                err.print(f"{gone}{p.name} started again (pid {p.pid}, restart {p.restarts})", highlight=False)
            if reported.get(p.name) != p.pid and not procs.alive(p):
                reported[p.name] = p.pid
                again = "; the keeper starts it again" if keeper and p.role != local.KEEPER else ""
                err.print(f"[red]{p.name} (pid {p.pid}) exited[/]{again}; see {p.log}", highlight=False,
                          soft_wrap=True)
        time.sleep(1.0)


def _token(args: argparse.Namespace) -> int:
    if not args.subject.strip():
        return _fail("--subject must not be empty")
    if not 0 < args.expires_in <= MAX_TOKEN_LIFETIME_S:
        return _fail(f"--expires-in must be more than 0 and at most {MAX_TOKEN_LIFETIME_S:.0f} seconds, "
                     f"got {args.expires_in:.12g}")
    where = _found(args)
    state = local.read_state(where)
    if state is None:
        return _fail(_not_found(args, "no mesh is running"))
    if not state.policy.gateway.auth.enabled:
        return _fail("this mesh's gateway takes no token: mesh.yaml sets gateway.auth.enabled to false")
    print(local.mint_token(state, where, args.subject, args.expires_in))
    return 0


def _down(args: argparse.Namespace) -> int:
    where = _found(args)
    try:
        stopped = local.down(where)
    except local.MeshError as exc:
        return _fail(str(exc))
    if stopped:
        console.print(f"stopped {len(stopped)} processes (state in {where}; `python -m mesh logs` still reads "
                      "their logs)", highlight=False, soft_wrap=True)
    else:
        console.print(_not_found(args, "no mesh is running"), highlight=False, soft_wrap=True)
    return 0


MIN_INTERVAL_S = 0.1  # `status --watch`: each reading asks every Envoy's admin


def _status(args: argparse.Namespace) -> int:
    if args.watch and not MIN_INTERVAL_S <= args.interval <= 3600:
        return _fail(f"--interval must be between {MIN_INTERVAL_S:g} and 3600 seconds, got {args.interval:.12g}")
    where = _found(args)
    if local.read_state(where) is None:
        return _fail(_not_found(args, "no mesh is running"))
    if args.watch:
        return records_view.watch(where, console, args.interval, args.json)
    try:
        state, rows = local.status(where)
    except local.MeshError as exc:
        return _fail(str(exc))
    reading = read_records(state, where)
    if args.json:
        ca = _gateway_ca(state, where)
        _print_json({"pipeline": state.layout.pipeline, "gateway_url": state.layout.gateway_url,
                     "gateway_grpc": state.layout.gateway_grpc_address, "gateway_ca": str(ca) if ca else None,
                     "gateway_auth": state.policy.gateway.auth.enabled, "state_dir": str(where.resolve()),
                     "socket_dir": state.layout.socket_dir,
                     "processes": [{"name": r.proc.name, "role": r.proc.role, "stage": r.proc.stage,
                                    "pid": r.proc.pid, "alive": r.alive, "ready": r.ready,
                                    "restarts": r.proc.restarts, "problem": r.problem, "log": r.proc.log}
                                   for r in rows],
                     "discovery": records_view.as_json(reading),
                     "splits": None if state.pinning is None else [
                         {"name": s.name, "weight": s.weight, "stages": len(s.plan.stages),
                          "pipeline_dir": s.pipeline_dir} for s in state.pinning.splits]})
    else:
        _print_status(state, rows, where)
        console.print(records_view.render(reading, console.width), soft_wrap=True)
    dead = [r.proc.name for r in rows if not r.alive]
    if dead:
        keeper = any(r.alive and r.proc.role == local.KEEPER for r in rows)
        keep = "python -m mesh keep" + (f" --state-dir {args.state_dir}" if args.state_dir else "")
        if dead == [local.KEEPER]:
            err.print(f"[red]the keeper is not running:[/] nothing starts again what exits; `{keep}` starts it "
                      "again", highlight=False, soft_wrap=True)
            return 1
        then = ("the keeper starts them again (see `python -m mesh logs keeper`)" if keeper else
                "nothing starts them again (no keeper: `mesh up --no-restart`, or it was stopped); "
                f"`{keep}` starts a keeper, which starts them again")
        err.print(f"[red]{len(dead)} process(es) not running:[/] {', '.join(dead)}; {then}", highlight=False,
                  soft_wrap=True)
        return 1
    unready = [r.proc.name for r in rows if r.ready is False]
    if unready:
        err.print(f"[yellow]{len(unready)} process(es) running but not ready:[/] {', '.join(unready)}; still starting, "
                  "frozen, or failing their readiness check (a sidecar is not ready while its app is not); the "
                  "pipeline may not answer", highlight=False, soft_wrap=True)
        return 1
    return 0


def _print_status(state: local.State, rows: list[local.ProcStatus], where: Path) -> None:
    console.print(f"pipeline {state.layout.pipeline}, gateway {state.layout.gateway_url}, state in {where}",
                  highlight=False, soft_wrap=True)
    if state.pinning is not None:
        console.print(f"splits (pinned by x-pipeline-version): {cli_split.summary(state)}", highlight=False,
                      soft_wrap=True)
    labels = {True: "[green]ready[/]", False: "[yellow]running, not ready[/]", None: "[red]crashed or killed[/]"}
    # The log column only where it fits whole; else one line says where every log is.
    for columns in (("process", "role", "pid", "restarts", "state", "log"),
                    ("process", "role", "pid", "restarts", "state")):
        table = compact_table(*columns, right=("pid", "restarts"))
        for row in rows:
            cells = [row.proc.name, row.proc.role, str(row.proc.pid), str(row.proc.restarts),
                     labels[row.ready if row.alive else None]]
            table.add_row(*cells, *([row.proc.log] if "log" in columns else []))
        if fits(table, console.width):
            break
    console.print(table)
    for row in rows:
        if row.problem:
            console.print(f"[yellow]{row.problem}[/]", highlight=False, soft_wrap=True)
    if "log" not in columns:
        console.print(f"logs: {where / 'logs'}/<process>.log, or `python -m mesh logs <process>`",
                      highlight=False, soft_wrap=True)


def _logs(args: argparse.Namespace) -> int:
    if args.lines < 0:
        return _fail(f"--lines must be 0 (the whole log) or more, got {args.lines}")
    where = _found(args)
    if local.read_last_state(where) is None:
        return _fail(_not_found(args, "no mesh has run here"))
    try:
        files = local.log_files(args.name, where, sidecars=not args.no_sidecars)
    except local.MeshError as exc:
        if args.name == local.KEEPER:
            return _fail("this mesh runs no keeper (`mesh up --no-restart`): nothing restarts its processes")
        return _fail(str(exc))
    for f in files:
        console.rule(str(f))
        text = f.read_text(errors="replace") if args.lines == 0 else procs.tail(f, args.lines)
        sys.stdout.write(text + ("\n" if text else ""))
    return 0


def _keep(args: argparse.Namespace) -> int:
    where = _found(args)
    if local.read_state(where) is None:
        return _fail(_not_found(args, "no mesh is running"))
    try:
        keeper = local.keep(where)
    except local.MeshError as exc:
        return _fail(str(exc))
    console.print(f"keeper started (pid {keeper.pid}): what exits is started again; `python -m mesh logs keeper` "
                  f"says what it does", highlight=False, soft_wrap=True)
    return 0


def _apply(args: argparse.Namespace) -> int:
    where = _found(args)
    state = local.read_state(where)
    if state is None:
        return _fail(_not_found(args, "no mesh is running"))
    try:
        resolved = local.apply(args.policy, where)
    except local.MeshError as exc:
        return _fail(str(exc))
    used = args.policy or state.policy_file
    console.print(f"policy: {used or 'the built-in defaults'}" + ("" if args.policy else " (as `up` used it)"),
                  highlight=False, soft_wrap=True)
    for s, hop in zip(resolved.stages, resolved.hops, strict=True):
        console.print(f"{s.name}: versions {', '.join(f'{v.name}={v.weight}%' for v in s.versions)}, "
                      f"timeout {hop.route.timeout_s}s, {hop.route.attempts} retries", highlight=False, soft_wrap=True)
    console.print("applied: Envoy reloads its watched configuration files; nothing was restarted")
    return 0


def _demo_target(args: argparse.Namespace) -> tuple[local.GatewayCredentials, Manifest]:
    """The gateway (URL, CA, token) and the pipeline's manifest: from the options, else from the running mesh
    (a fresh token for the subject `demo-request`)."""
    state = None
    if args.url is None or args.pipeline is None:
        state = local.read_state(_found(args))
        if state is None:
            missing = "--url and --pipeline" if args.url is None else "--pipeline"
            raise local.MeshError(_not_found(args, f"no mesh is running to take {missing} from"))
    if args.url:
        gateway = local.GatewayCredentials(url=args.url.rstrip("/"), grpc_address=None, ca=args.cacert,
                                           token=args.token)
    else:
        gateway = local.gateway_credentials(_found(args), state, "demo-request")
        if args.token:
            gateway = dataclasses.replace(gateway, token=args.token)
    manifest = load_manifest(args.pipeline or state.pipeline_dir)  # type: ignore[union-attr]
    if args.url is None and state is not None and manifest.name != state.layout.pipeline:
        raise local.MeshError(f"--pipeline {args.pipeline} holds pipeline {manifest.name!r}, but the running mesh "
                              f"serves {state.layout.pipeline!r}: leave out --pipeline, or start a mesh of it")
    return gateway, manifest


def _demo_request(args: argparse.Namespace) -> int:
    try:
        gateway, manifest = _demo_target(args)
    except (ManifestError, local.MeshError) as exc:
        return _fail(str(exc))
    url = gateway.url
    rng = np.random.default_rng(args.seed)
    inputs = {}
    for t in manifest.inputs:
        shape = [1] + [max(d, 1) for d in t.shape[1:]]
        inputs[t.name] = rng.random(shape).astype(DATATYPE_TO_NUMPY[t.datatype])
    headers = {"host": args.host} if args.host else {}
    try:
        with gateway.client(timeout=60.0) as client:
            start = time.perf_counter()
            outputs, response = infer(client, url, manifest.name, inputs, headers=headers, server_name=args.host)
            total_ms = (time.perf_counter() - start) * 1000
    except httpx.HTTPError as exc:
        return _fail(f"request to {url} failed: {exc}")
    top5 = {}
    for name, array in outputs.items():
        scores = array.reshape(array.shape[0], -1)[0]
        top5[name] = [(int(i), float(scores[i])) for i in np.argsort(scores)[::-1][:5]]
    timing = stage_timing(response.headers.get(STAGE_TIMING))
    if args.json:
        _print_json({"url": f"{url}/v2/models/{manifest.name}/infer", "status": response.status_code,
                     "ms": round(total_ms, 3), "top5": {k: [{"class": c, "score": p} for c, p in v]
                                                        for k, v in top5.items()},
                     "stages": [{"stage": st, "version": v, "ms": ms} for st, v, ms in timing]})
        return 0
    console.print(f"POST {url}/v2/models/{manifest.name}/infer (binary, batch 1): {response.status_code}, "
                  f"{total_ms:.1f} ms end to end", highlight=False, soft_wrap=True)
    for name, top in top5.items():
        console.print(f"top-{len(top)} of {name}: " + ", ".join(f"class {c} ({p:.4f})" for c, p in top),
                      highlight=False, soft_wrap=True)
    console.print(f"time per stage ({STAGE_TIMING}):", highlight=False)
    table = compact_table("stage", "version", "ms", right=("ms",))
    for stage, version, ms in timing:
        table.add_row(stage, version, f"{ms:.2f}")
    console.print(table)
    return 0
