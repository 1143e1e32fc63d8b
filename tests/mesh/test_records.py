"""`mesh status`'s discovery records on a real local mesh: every endpoint of every version, with the weight
and health its callers' Envoys report; a killed replica is ejected by its callers and shows invalid, with
the time it was last seen healthy; `--watch` refreshes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh import local
from mesh.records import read_records
from mesh.v2client import infer
from tests.mesh.local_mesh import REPO, gateway_client, mesh_cli, running_mesh, write_policy
from tests.tiny import write_tiny_pipeline

MIDDLE = "rec-stage-1"
POLICY = {"stages": {MIDDLE: {"replicas": 2, "versions": [{"name": "v1", "weight": 80}, {"name": "v2", "weight": 20}]}}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[local.State, Path]]:
    tmp = tmp_path_factory.mktemp("mesh-records")
    write_tiny_pipeline(tmp / "rec", name="rec")
    policy = write_policy(tmp / "mesh.yaml", POLICY)
    # no keeper: the killed replicas must stay down for their records to show it
    with running_mesh(tmp / "rec", policy, tmp / ".mesh", "--no-restart") as state:
        yield state, tmp / ".mesh"


def discovery(state_dir: Path) -> dict:
    result = mesh_cli("status", "--json", "--state-dir", str(state_dir))
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)["discovery"]


def test_every_endpoint_of_every_version_with_its_weight(mesh: tuple[local.State, Path]) -> None:
    state, state_dir = mesh
    started = time.time()
    records = discovery(state_dir)["records"]
    seen = {(r["service"], r["version"], r["address"]): r for r in records}
    expected = {(rep.stage, rep.version, f"127.0.0.1:{rep.inbound_port}"): rep.name for rep in state.layout.replicas}
    assert set(seen) == set(expected)
    for key, record in seen.items():
        assert record["replica"] == expected[key] and record["valid"] is True and record["ejected"] is False
        assert started - 1 <= record["last_seen_healthy_unix"] <= time.time()
        assert record["weight"] == {"v1": 80, "v2": 20}[record["version"]] if record["service"] == MIDDLE else 100
    callers = {r["service"]: r["observers"] for r in records}
    assert callers["rec-stage-0"] == ["gateway"]
    assert callers[MIDDLE] == ["rec-stage-0-v1-0-sidecar"]

    table = mesh_cli("status", "--state-dir", str(state_dir), columns=80)
    assert table.returncode == 0, table.stderr
    ours = table.stdout[table.stdout.index("discovery records"):]  # the lines above print paths whole
    assert max(map(len, ours.splitlines())) <= 80
    lines = [line.split() for line in ours.splitlines() if line.startswith(MIDDLE)]
    assert sorted((cells[1], cells[2], cells[-1]) for cells in lines) == [
        ("v1", "80%", "yes"), ("v1", "80%", "yes"), ("v2", "20%", "yes"), ("v2", "20%", "yes")]


def test_a_killed_replica_is_ejected_and_keeps_its_last_healthy_time(mesh: tuple[local.State, Path]) -> None:
    state, state_dir = mesh
    victim = state.layout.of_version(MIDDLE, "v1")[1]
    address = f"127.0.0.1:{victim.inbound_port}"
    before = {r.address: r for r in read_records(state, state_dir).records}[address]
    assert before.valid and before.last_seen_healthy is not None
    for p in state.procs:
        if p.name in (victim.name, f"{victim.name}-sidecar"):
            os.kill(p.pid, signal.SIGKILL)
    x = np.ones((1, 16), np.float32)
    last_valid = before.last_seen_healthy
    deadline = time.monotonic() + 60
    with gateway_client(state_dir) as client:
        while time.monotonic() < deadline:
            infer(client, state.layout.gateway_url, "rec", {"x": x})  # retried elsewhere: never fails
            reading = read_records(state, state_dir)
            now = {r.address: r for r in reading.records}[address]
            if now.ejected:
                break
            if now.valid:  # until its sidecar's check or a caller's Envoy has seen it fail
                last_valid = reading.read_at
    assert now.ejected and not now.valid
    record = next(r for r in discovery(state_dir)["records"] if r["address"] == address)
    assert record["valid"] is False and record["ejected"] is True
    assert record["last_seen_healthy_unix"] == pytest.approx(last_valid, abs=1e-3)
    assert record["last_seen_healthy_unix"] < reading.read_at
    others = [r for r in discovery(state_dir)["records"] if r["address"] != address]
    assert all(r["valid"] for r in others)


def test_a_replica_whose_app_died_is_invalid_before_any_caller_notices(mesh: tuple[local.State, Path]) -> None:
    """No traffic, so no caller ejects it; its own sidecar's readiness check sees the app gone, as a failing
    readiness probe takes a pod out of its Service's endpoints."""
    state, state_dir = mesh
    victim = state.layout.of_version(MIDDLE, "v2")[1]
    address = f"127.0.0.1:{victim.inbound_port}"
    assert {r.address: r for r in read_records(state, state_dir).records}[address].valid
    (app,) = [p for p in state.procs if p.name == victim.name]
    os.kill(app.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = {r.address: r for r in read_records(state, state_dir).records}[address]
        if not now.valid:
            break
        time.sleep(0.2)
    assert not now.valid and not now.healthy and not now.ejected
    record = next(r for r in discovery(state_dir)["records"] if r["address"] == address)
    assert record["valid"] is False and record["healthy"] is False


def test_watch_refreshes_until_interrupted(mesh: tuple[local.State, Path]) -> None:
    _, state_dir = mesh
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "status", "--watch", "--json", "--interval", "0.3",
                             "--state-dir", str(state_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    readings = [json.loads(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert readings[1]["read_at"] > readings[0]["read_at"]
    assert all(len(r["records"]) == len(readings[0]["records"]) > 0 for r in readings)
