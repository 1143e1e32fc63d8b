"""A new split of the same model rolled out live on the local mesh: split-canary, split-promote, split-rollback.

`split_canary` starts every stage of the new split (app and sidecar each, its replicas named and its clusters
tagged by the split, since its stages may share the old split's names) beside the running one, with requests
pinned (mesh.splits): the gateway first assigns every new request to the running split at 100% and the new
split gets 0%, so pinning is on before anything can reach the new stages; once every Envoy that calls a new
stage has seen it healthy (their own health checks, read from their admin: mesh.records), the weight moves.
Later calls only move the weight. `split_promote` and `split_rollback` send every new request to the side that
stays, wait until the gateway has no request of the other side in flight (its clusters' `upstream_rq_active`),
stop that side's processes, and leave the mesh serving one split, still pinned. No process of the side that
stays is restarted; every step is a rewrite of the Envoys' watched files.

The policy, so changed, is the state directory's `policy.yaml` (`splits:` with absolute paths), which
`mesh apply` and `mesh render --policy` read as well.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from mesh import sockets
from mesh.envoy_grpc import grpc_cluster_name
from mesh.layout import LOOPBACK, Layout, Replica, new_replica, subset_name
from mesh.local import (
    GATEWAY,
    MeshError,
    State,
    _load_inputs,
    changes_mesh,
    load_pinning,
    start_replicas,
    wait_started,
    write_state,
    write_state_envoys,
)
from mesh.records import read_records
from mesh.rollout import POLICY_FILE, policy_data, running_state, stop_replicas
from mesh.splits import Pinning, split_path
from model_export.manifest import ManifestError, load_manifest

DRAIN_TIMEOUT_S = 60.0  # the longest a request already pinned to the leaving split may still take
ROUTE_TIMEOUT_S = 30.0  # for the gateway to load a rewritten route file


def _write_policy(state: State, state_dir: Path, splits: list[dict[str, Any]],
                  stages: dict[str, Any] | None = None) -> tuple[Path, Pinning]:
    """The mesh's policy with `splits` (and, given, the running pipeline's `stages`), written to the state
    directory and resolved."""
    data = policy_data(state)
    data["splits"] = splits
    if stages is not None:
        data["stages"] = stages
    path = state_dir / POLICY_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    manifest, _ = _load_inputs(Path(state.pipeline_dir), path)
    pinning = load_pinning(Path(state.pipeline_dir), path, manifest)
    assert pinning is not None
    return path, pinning


def _splits(state: State) -> list[dict[str, Any]]:
    """The policy's split entries as running: the running pipeline's first."""
    if state.pinning is None:
        return [{"pipeline": state.pipeline_dir, "weight": 100}]
    policy_dir = Path(state.policy_file).resolve().parent if state.policy_file else None
    entries = {str(split_path(e["pipeline"], policy_dir)): e for e in policy_data(state).get("splits") or []}
    out = []
    for s in state.pinning.splits:
        entry = {k: v for k, v in entries.get(s.pipeline_dir, {}).items() if k != "pipeline"}
        out.append({"pipeline": s.pipeline_dir, **entry, "weight": s.weight})
    return out


def _apply(state: State, state_dir: Path, path: Path, pinning: Pinning) -> None:
    state.pinning, state.policy, state.policy_file = pinning, pinning.splits[0].plan, str(path.resolve())
    write_state_envoys(state_dir, state)
    write_state(state_dir, state)
    wait_routed(state)


def _split_layout(state: State, pinning: Pinning, name: str) -> Layout:
    """Every replica of the new split, tagged with its name: a free inbound port each, its sockets in the mesh's
    socket directory under slots no running replica holds; the running gateway's listeners."""
    split = pinning.split(name)
    socket_dir = Path(state.layout.socket_dir)
    slot = max((r.slot for r in state.all_replicas()), default=-1) + 1
    last = len(split.plan.stages) - 1
    replicas: list[Replica] = []
    with ExitStack() as stack:
        for stage in split.plan.stages:
            for version in stage.versions:
                for k in range(stage.replicas):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind((LOOPBACK, 0))
                    file = str((Path(split.pipeline_dir) / version.file).resolve()) if version.file else None
                    replicas.append(new_replica(socket_dir, slot + len(replicas), stage.name, stage.index, last,
                                                version.name, k, file, int(s.getsockname()[1]))
                                    .model_copy(update={"split": name}))
    return state.layout.model_copy(update={"pipeline_dir": split.pipeline_dir, "split": name, "replicas": replicas})


def _start(state: State, state_dir: Path, name: str, timeout_s: float) -> None:
    """Start every replica of split `name` (its Envoy files are written) and wait until each is ready."""
    bootstraps = write_state_envoys(state_dir, state)
    split = state.pinning.split(name) if state.pinning else None
    assert split is not None
    started = start_replicas(state, state_dir, state.split_layouts[name].replicas,
                             Path(split.pipeline_dir) / "pipeline.json", split.plan, bootstraps)
    wait_started(state, started, timeout_s)


def expected_callers(layout: Layout, replica: Replica) -> set[str]:
    """The Envoys that call `replica`: the gateway for a first stage, else the sidecars of the stage before."""
    if replica.index == 0:
        return {GATEWAY}
    return {f"{r.name}-sidecar" for r in layout.replicas if r.index == replica.index - 1}


def wait_seen_healthy(state: State, state_dir: Path, layout: Layout, timeout_s: float) -> None:
    """Wait until every Envoy that calls a replica of `layout` has it in its cluster and has seen it pass its
    own health check: a ready replica is not routable before that ('no healthy upstream')."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(state, state_dir).records
        waiting = []
        for r in layout.replicas:
            address = f"{LOOPBACK}:{r.inbound_port}"
            seen = [x for x in records if x.address == address and x.version == r.subset and x.service == r.stage]
            if not (seen and seen[0].valid and set(seen[0].observers) == expected_callers(layout, r)):
                waiting.append(r.name)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise MeshError(f"the callers' Envoys did not see {waiting} healthy within {timeout_s:.0f} s")
        time.sleep(0.2)


def _new_split(state: State, source: Path) -> str:
    try:
        return load_manifest(source).split_id
    except ManifestError as exc:
        raise MeshError(f"--pipeline {source}: {exc}") from exc


@changes_mesh
def split_canary(state_dir: Path, weight: int, source: Path | None = None, timeout_s: float = 120.0) -> State:
    """Send `weight`% of new requests to the split in pipeline `source` (the first time, its stages are started
    beside the running split's), or move an already running new split's weight."""
    if not 0 <= weight <= 100:
        raise MeshError(f"--weight must be 0..100, got {weight}")
    state = running_state(state_dir)
    entries = _splits(state)
    if source is None or (state.pinning and _new_split(state, source) in state.pinning.names[1:]):
        if len(entries) != 2:
            raise MeshError("no new split is running: give --pipeline DIR, the new split's pipeline directory")
        entries[0]["weight"], entries[1]["weight"] = 100 - weight, weight
        _apply(state, state_dir, *_write_policy(state, state_dir, entries))
        return state
    if len(entries) != 1:
        raise MeshError(f"the mesh already serves splits {state.pinning.names if state.pinning else []}: "
                        "promote or roll back before another split")
    name = _new_split(state, source)
    if state.pinning is not None and name in state.pinning.names or name == load_manifest(state.pipeline_dir).split_id:
        raise MeshError(f"--pipeline {source} has the running split's cuts ({name}): roll a changed stage out "
                        "with `python -m mesh canary --stage NAME` instead")
    entries = [{**entries[0], "weight": 100}, {"pipeline": str(source.resolve()), "weight": 0}]
    path, pinning = _write_policy(state, state_dir, entries)
    state.split_layouts[name] = _split_layout(state, pinning, name)
    _apply(state, state_dir, path, pinning)  # pinned at 100:0 before any new stage can be reached
    _start(state, state_dir, name, timeout_s)
    wait_seen_healthy(state, state_dir, state.split_layouts[name], timeout_s)
    entries[0]["weight"], entries[1]["weight"] = 100 - weight, weight
    _apply(state, state_dir, *_write_policy(state, state_dir, entries))
    return state


def _active_requests(admin_socket: str, clusters: list[str]) -> int:
    stats = sockets.get(admin_socket, "/stats", format="json", filter="upstream_rq_active$")
    wanted = {f"cluster.{c}.upstream_rq_active" for c in clusters}
    return sum(int(s.get("value", 0)) for s in stats.json().get("stats", []) if s.get("name") in wanted)


def gateway_assignments(admin_socket: str) -> dict[str, int]:
    """The clusters (and weights) the gateway's loaded route assigns new requests to: its first REST route
    that matches no header."""
    dump = sockets.get(admin_socket, "/config_dump", resource="dynamic_route_configs").json()
    for config in dump.get("configs", []):
        route_config = config.get("route_config", {})
        if route_config.get("name") != GATEWAY:
            continue
        for route in route_config.get("virtual_hosts", [{}])[0].get("routes", []):
            action = route.get("route")
            if action and "headers" not in route.get("match", {}):
                if "cluster" in action:
                    return {action["cluster"]: 100}
                return {c["name"]: int(c["weight"]) for c in action["weighted_clusters"]["clusters"]}
    return {}


def _expected_assignments(state: State) -> dict[str, int]:
    assert state.pinning is not None
    layouts = {state.pinning.splits[0].name: state.layout, **state.split_layouts}
    first = {s.name: s.plan.hops[0].callee for s in state.pinning.splits}
    return {f"outbound|{subset_name(layouts[a.split].split, a.version)}|{first[a.split]}": a.weight
            for a in state.pinning.assignments()}


def wait_routed(state: State, timeout_s: float = ROUTE_TIMEOUT_S) -> None:
    """Wait until the gateway has loaded the assignment the state holds (Envoy reads its watched files
    moments after they change; later on a busy machine)."""
    expected = _expected_assignments(state)
    deadline = time.monotonic() + timeout_s
    while gateway_assignments(state.layout.gateway_admin_socket) != expected:
        if time.monotonic() > deadline:
            raise MeshError(f"the gateway did not load its new route ({expected}) within {timeout_s:.0f} s")
        time.sleep(0.1)


def wait_drained(state: State, layout: Layout, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Wait until the gateway has no request in flight to the first stage of the split of `layout` (whose
    weight is 0 and loaded: `wait_routed`): every request pinned to it has been answered (a request stays
    active at the gateway until the whole chain has answered)."""
    rest = {f"outbound|{r.subset}|{r.stage}" for r in layout.replicas if r.index == 0}
    clusters = sorted(rest | {grpc_cluster_name(c) for c in rest})
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2:  # twice in a row: one reading may fall between a request's arrival and its routing
        quiet = quiet + 1 if _active_requests(state.layout.gateway_admin_socket, clusters) == 0 else 0
        if time.monotonic() > deadline:
            raise MeshError(f"requests pinned to the leaving split were still in flight after {timeout_s:.0f} s")
        time.sleep(0.2)


def _finish(state_dir: Path, keep_new: bool, grace_s: float) -> State:
    state = running_state(state_dir)
    entries = _splits(state)
    if len(entries) != 2 or state.pinning is None:
        raise MeshError("no new split is running: nothing to promote or roll back")
    new = state.pinning.splits[1].name
    stay, leave = (entries[1], entries[0]) if keep_new else (entries[0], entries[1])
    stay["weight"], leave["weight"] = 100, 0
    _apply(state, state_dir, *_write_policy(state, state_dir, entries))
    leaving = state.split_layouts[new] if not keep_new else state.layout
    wait_drained(state, leaving)
    stop_replicas(state, {r.name for r in leaving.replicas}, grace_s)
    if keep_new:
        kept = state.split_layouts.pop(new)
        stages = stay.pop("stages", {})
        state.pipeline_dir, state.layout = stay["pipeline"], kept
        path, pinning = _write_policy(state, state_dir, [stay], stages=stages)
    else:
        state.split_layouts.pop(new)
        path, pinning = _write_policy(state, state_dir, [stay])
    _apply(state, state_dir, path, pinning)
    return state


@changes_mesh
def split_promote(state_dir: Path, grace_s: float = 10.0) -> State:
    """Every new request to the new split; the old split's stages drained and stopped."""
    return _finish(state_dir, keep_new=True, grace_s=grace_s)


@changes_mesh
def split_rollback(state_dir: Path, grace_s: float = 10.0) -> State:
    """Every new request back to the running split; the new split's stages drained and stopped."""
    return _finish(state_dir, keep_new=False, grace_s=grace_s)
