"""Live rollout of one stage's new version on the running local mesh: canary, promote, rollback.

`canary` starts the new version's replicas (app and sidecar each) beside the old ones while the callers
route nothing to them (a version at weight 0 is deployed but unrouted, as istiod does), waits until they
are ready, then moves the weight by rewriting the callers' watched Envoy files, as `mesh apply` does: no
process restarts. `promote` and `rollback` route everything to the side that stays, let the requests in
flight on the other side finish, stop its processes (each app answers not-ready before it closes), and
drop its clusters. The mesh's policy, so changed, is kept in the state directory (`policy.yaml`), so
`mesh apply` and `mesh render --policy` read the same one.
"""

from __future__ import annotations

import shutil
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from mesh import procs
from mesh.layout import LOOPBACK, Layout, Replica, new_replica, subset_name
from mesh.local import (
    MeshError,
    State,
    _load_inputs,
    changes_mesh,
    read_state,
    start_replicas,
    wait_started,
    write_envoy_configs,
    write_state,
)
from mesh.plan import Plan
from mesh.records import read_records, routed_weights
from model_export.contract import check_contract
from model_export.manifest import ManifestError, load_manifest, sha256_file, verify_stage_file

POLICY_FILE = "policy.yaml"  # the mesh's own policy, as canary/promote/rollback left it
DRAIN_S = 3.0  # after the route leaves a side: its requests in flight finish (retries included)


def running_state(state_dir: Path) -> State:
    state = read_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh is running from {state_dir}; start one with `python -m mesh up --detach`")
    return state


def policy_data(state: State) -> dict[str, Any]:
    if state.policy_file is None:
        return {}
    return yaml.safe_load(Path(state.policy_file).read_text()) or {}


def _with_versions(state: State, state_dir: Path, stage: str, versions: list[dict[str, Any]]) -> tuple[Path, Plan]:
    """The mesh's policy with `stage`'s versions replaced, written to the state directory and resolved."""
    data = policy_data(state)
    stages = data.setdefault("stages", {}) or {}
    stages[stage] = {**(stages.get(stage) or {}), "versions": versions}
    data["stages"] = stages
    path = state_dir / POLICY_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _, resolved = _load_inputs(Path(state.pipeline_dir), path)
    return path, resolved


def _versions(state: State, stage: str) -> list[dict[str, Any]]:
    try:
        plan = state.policy.stage(stage)
    except KeyError as exc:
        raise MeshError(str(exc.args[0])) from exc
    out = []
    for v in plan.versions:
        entry: dict[str, Any] = {"name": v.name, "weight": v.weight}
        if v.file is not None:
            entry["file"] = v.file
        out.append(entry)
    return out


def _new_replicas(layout: Layout, resolved: Plan, stage: str, version: str, file: Path) -> list[Replica]:
    plan = resolved.stage(stage)
    last = len(resolved.stages) - 1
    slot = layout.next_slot()
    with ExitStack() as stack:

        def free() -> int:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            return int(s.getsockname()[1])

        return [new_replica(Path(layout.socket_dir), slot + k, stage, plan.index, last, version, k, str(file),
                            free()).model_copy(update={"split": layout.split}) for k in range(plan.replicas)]


def _apply(state: State, state_dir: Path, policy_file: Path, resolved: Plan, stage: str,
           timeout_s: float = 30.0) -> None:
    """Write the callers' Envoy files and return once every caller routes `stage` by the new weights: Envoy
    reloads a watched file on its own time, and a step taken before (counting a split, stopping the side
    that leaves) would see the old routes."""
    write_envoy_configs(state_dir, resolved, state.layout, state.pinning, state.split_layouts)
    state.policy, state.policy_file = resolved, str(policy_file.resolve())
    write_state(state_dir, state)
    wanted = {subset_name(state.layout.split, v.version): v.weight for v in resolved.hop_into(stage).route.destinations}
    deadline = time.monotonic() + timeout_s
    while True:
        seen = routed_weights(state, stage)
        # an Envoy whose routes never name the stage does not call it
        behind = sorted(name for name, weights in seen.items() if weights is None or weights and weights != wanted)
        if not behind:
            return
        if time.monotonic() > deadline:
            raise MeshError(f"{', '.join(behind)} still route {stage} by {[seen[n] for n in behind]}, "
                            f"not {wanted}, {timeout_s:.0f} s after the change")
        time.sleep(0.1)


def _start(state: State, state_dir: Path, replicas: list[Replica], timeout_s: float) -> None:
    bootstraps = write_envoy_configs(state_dir, state.policy, state.layout, state.pinning, state.split_layouts)
    started = start_replicas(state, state_dir, replicas, Path(state.pipeline_dir) / "pipeline.json", state.policy,
                             bootstraps)
    wait_started(state, started, timeout_s)


def _wait_seen_healthy(state: State, state_dir: Path, stage: str, version: str, replicas: list[Replica],
                       timeout_s: float) -> None:
    """Wait until every caller's Envoy has the new replicas in its cluster and has seen them pass a health
    check. A replica that is ready is not yet routable: a caller marks a new host healthy only after its own
    first check, and weight moved before that answers 503 "no healthy upstream" (seen under load)."""
    addresses = {f"{LOOPBACK}:{r.inbound_port}" for r in replicas}
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in read_records(state, state_dir).records if r.service == stage]
        callers = {o for r in records for o in r.observers}
        ours = {r.address: r for r in records
                if r.version == subset_name(state.layout.split, version) and r.address in addresses}
        if ours.keys() == addresses and all(r.valid and set(r.observers) == callers for r in ours.values()):
            return
        if time.monotonic() > deadline:
            raise MeshError(f"{stage} {version}: the callers' Envoys did not see {sorted(addresses)} healthy "
                            f"within {timeout_s:.0f} s")
        time.sleep(0.2)


@changes_mesh
def canary(state_dir: Path, stage: str, version: str, weight: int, source: Path | None = None,
           timeout_s: float = 120.0) -> State:
    """Route `weight`% of `stage`'s requests to `version`: the stage's version in pipeline `source` (the first
    time, its replicas are started), or an already running canary's new weight."""
    if not 0 <= weight <= 100:
        raise MeshError(f"--weight must be 0..100, got {weight}")
    state = running_state(state_dir)
    versions = _versions(state, stage)
    names = [v["name"] for v in versions]
    if version in names and len(names) == 2 and names[1] == version:  # the running canary: a new weight
        versions[0]["weight"], versions[1]["weight"] = 100 - weight, weight
        path, resolved = _with_versions(state, state_dir, stage, versions)
        _apply(state, state_dir, path, resolved, stage)
        return state
    if len(names) != 1:
        raise MeshError(f"{stage} already runs versions {names}: promote or roll back before another canary")
    if state.split_layouts:
        raise MeshError(f"a new split runs beside this one ({', '.join(state.split_layouts)}): promote or roll it "
                        "back (`mesh split-promote` / `split-rollback`) before a stage's canary")
    if source is None:
        raise MeshError(f"{stage} {version} is not running yet: give --pipeline DIR, the pipeline holding it "
                        "(as `model_export retrain-stage` writes it)")
    file = _checked_file(state, source, stage, version)
    old = {**versions[0], "weight": 100}
    path, resolved = _with_versions(state, state_dir, stage, [old, {"name": version, "weight": 0, "file": file}])
    state.policy, state.policy_file = resolved, str(path.resolve())
    new = _new_replicas(state.layout, resolved, stage, version, (Path(state.pipeline_dir) / file).resolve())
    state.layout = state.layout.model_copy(update={"replicas": [*state.layout.replicas, *new]})
    _start(state, state_dir, new, timeout_s)
    _wait_seen_healthy(state, state_dir, stage, version, new, timeout_s)
    path, resolved = _with_versions(state, state_dir, stage, [{**old, "weight": 100 - weight},
                                                             {"name": version, "weight": weight, "file": file}])
    _apply(state, state_dir, path, resolved, stage)
    return state


def _checked_file(state: State, source: Path, stage: str, version: str) -> str:
    try:
        new = load_manifest(source)
        new_stage = new.stage(stage)
        path = verify_stage_file(source, new_stage)
        report = check_contract(Path(state.pipeline_dir), source)
    except (ManifestError, KeyError) as exc:
        raise MeshError(f"--pipeline {source}: {exc}") from exc
    if new_stage.version != version:
        raise MeshError(f"--pipeline {source} holds {stage} {new_stage.version}, not {version}")
    if not report.fits:
        raise MeshError(f"{source} does not fit beside the running pipeline: {'; '.join(report.reasons())}")
    return _beside_pipeline(Path(state.pipeline_dir), path, new_stage.sha256)


def _beside_pipeline(pipeline_dir: Path, path: Path, sha256: str) -> str:
    """Copy the new stage file beside the running pipeline's manifest and return its plain name: the local mesh
    and `mesh render` (whose image holds the pipeline directory) then read the same `versions[].file`."""
    target = pipeline_dir / path.name
    if target.exists() and sha256_file(target) != sha256:
        raise MeshError(f"{target} exists with other contents than {path}; remove it or rename the new stage file")
    if not target.exists():
        shutil.copyfile(path, target)
    return path.name


def stop_replicas(state: State, names: set[str], grace_s: float) -> None:
    """Stop the replicas `names` (each sidecar before its app, so no new request reaches an app going away) and
    drop their processes from `state`."""
    gone = [p for p in state.procs if p.name in names or p.name.removesuffix("-sidecar") in names]
    order = {"sidecar": 0, "app": 1}
    left = procs.stop(sorted(gone, key=lambda p: order.get(p.role, 2)), grace_s=grace_s)
    if left:
        raise MeshError(f"could not stop {[p.name for p in left]}")
    state.procs = [p for p in state.procs if p not in gone]


def _finish(state_dir: Path, stage: str, keep_new: bool, grace_s: float) -> State:
    state = running_state(state_dir)
    versions = _versions(state, stage)
    if len(versions) != 2:
        raise MeshError(f"{stage} runs {[v['name'] for v in versions]}: no canary to promote or roll back")
    stay, leave = (versions[1], versions[0]) if keep_new else (versions[0], versions[1])
    routed = [{**v, "weight": 100 if v is stay else 0} for v in versions]
    path, resolved = _with_versions(state, state_dir, stage, routed)
    _apply(state, state_dir, path, resolved, stage)
    time.sleep(DRAIN_S)
    leaving = {r.name for r in state.layout.of_version(stage, leave["name"])}
    stop_replicas(state, leaving, grace_s)
    state.layout = state.layout.model_copy(update={
        "replicas": [r for r in state.layout.replicas if r.name not in leaving]})
    path, resolved = _with_versions(state, state_dir, stage, [{**stay, "weight": 100}])
    _apply(state, state_dir, path, resolved, stage)
    return state


@changes_mesh
def promote(state_dir: Path, stage: str, grace_s: float = 10.0) -> State:
    """All of `stage`'s requests to its canary; the old version's replicas drained and stopped."""
    return _finish(state_dir, stage, keep_new=True, grace_s=grace_s)


@changes_mesh
def rollback(state_dir: Path, stage: str, grace_s: float = 10.0) -> State:
    """All of `stage`'s requests back to its old version; the canary's replicas drained and stopped."""
    return _finish(state_dir, stage, keep_new=False, grace_s=grace_s)
