"""Faults through the real local mesh: a frozen (SIGSTOPped) replica under load, and faults injected from
`mesh.yaml` (Istio's `fault.delay`/`fault.abort`, applied by the callers' Envoys).

The load is bounded (a few seconds at 10 requests/s); latency figures are printed, never asserted, and
`python -m benchmarks.faults` measures the longer run for RELIABILITY.md."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.faults import (
    fault_under_load,
    freeze_under_load,
    gateway_client,
    mesh_sender,
    replica_pids,
    summarize,
)
from mesh import local, sockets
from mesh.envoy_config import APP_CLUSTER
from mesh.v2client import infer
from model_export.tiny import write_tiny_pipeline
from tests.mesh.local_mesh import mesh_cli, running_mesh, write_policy

NAME = "hang"
MIDDLE = f"{NAME}-stage-1"
LAST = f"{NAME}-stage-2"
POLICY: dict[str, Any] = {"stages": {MIDDLE: {"replicas": 2}}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[local.State, Path, Path]]:
    tmp = tmp_path_factory.mktemp("mesh-faults")
    pipeline = tmp / NAME
    write_tiny_pipeline(pipeline, name=NAME, widths=(16, 64, 16, 4))
    with running_mesh(pipeline, write_policy(tmp / "mesh.yaml", POLICY), tmp / ".mesh") as state:
        yield state, tmp / ".mesh", pipeline


def _stats(admin_socket: str, prefix: str) -> dict[str, int]:
    text = sockets.get(admin_socket, "/stats", filter=f"^{re.escape(prefix)}").text
    return {k: int(v) for k, v in (line.split(": ", 1) for line in text.splitlines()) if v.strip().isdigit()}


def _inputs(pipeline: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(5)
    inputs = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(4)]
    whole = ort.InferenceSession(str(pipeline / "model.onnx"))
    return inputs, [{"y": whole.run(None, x)[0]} for x in inputs]


def test_a_frozen_replica_is_retried_around_and_ejected(mesh: tuple[local.State, Path, Path]) -> None:
    state, state_dir, pipeline = mesh
    inputs, expected = _inputs(pipeline)
    victim = state.layout.of_stage(MIDDLE)[1].name
    outcomes = freeze_under_load(mesh_sender(state, inputs, expected), replica_pids(state, victim),
                                 rate=10.0, before_s=1.5, freeze_s=5.0, after_s=2.0,
                                 new_client=gateway_client(local.gateway_credentials(state_dir, state, "tests")))
    for s in summarize(outcomes):
        print(s)  # figures for the reader; `python -m benchmarks.faults` measures them at length
    assert [o.error for o in outcomes if o.error] == []
    assert len(outcomes) == 85
    # The caller's sidecar gave up on tries to the frozen replica (per-try or connect timeouts, both
    # local-origin failures) and ejected it; without a per-try timeout and local-origin outlier detection it
    # would have waited out the hop's whole timeout and never ejected.
    caller = state.layout.of_stage(f"{NAME}-stage-0")[0].admin_socket
    stats = _stats(caller, f"cluster.outbound|v1|{MIDDLE}.")
    cluster = f"cluster.outbound|v1|{MIDDLE}"
    timeouts = stats[f"{cluster}.upstream_rq_per_try_timeout"] + stats[f"{cluster}.upstream_cx_connect_timeout"]
    assert timeouts > 0, stats
    assert stats[f"{cluster}.upstream_rq_retry"] > 0, stats
    assert stats[f"{cluster}.outlier_detection.ejections_enforced_consecutive_local_origin_failure"] > 0, stats


def _status_until(state_dir: Path, done: Any, timeout: float = 30.0) -> Any:
    """`mesh status` again and again until `done(result)`; the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = mesh_cli("status", "--state-dir", str(state_dir))
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_status_exits_1_while_a_frozen_app_is_not_ready(mesh: tuple[local.State, Path, Path]) -> None:
    """A frozen app leaves every process running: status said so and exited 0 while the pipeline could not answer."""
    state, state_dir, _ = mesh
    victim = state.layout.of_stage(LAST)[0].name
    app = next(p.pid for p in state.procs if p.name == victim)
    os.kill(app, signal.SIGSTOP)
    try:
        frozen = _status_until(state_dir, lambda r: r.returncode != 0)
        said = " ".join(frozen.stderr.split())
        assert frozen.returncode == 1 and "process(es) running but not ready:" in said, frozen.stdout + said
        assert victim in said and "frozen" in said
    finally:
        os.kill(app, signal.SIGCONT)
    thawed = _status_until(state_dir, lambda r: r.returncode == 0)
    assert thawed.returncode == 0, thawed.stdout + thawed.stderr


def _fault_in_routes(admin_socket: str) -> bool:
    dump = sockets.get(admin_socket, "/config_dump", resource="dynamic_route_configs").text
    return "envoy.extensions.filters.http.fault.v3.HTTPFault" in dump


def _apply(state: local.State, state_dir: Path, tmp: Path, fault: dict[str, Any] | None) -> None:
    """`mesh apply` the fault (or none), then wait until every caller's Envoy serves the new routes."""
    policy = {"stages": {MIDDLE: {"replicas": 2}, **({LAST: {"fault": fault}} if fault else {})}}
    result = mesh_cli("apply", "--policy", str(write_policy(tmp / "fault.yaml", policy)),
                      "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    callers = [r.admin_socket for r in state.layout.of_stage(MIDDLE)]
    deadline = time.monotonic() + 30
    while any(_fault_in_routes(a) != (fault is not None) for a in callers):
        assert time.monotonic() < deadline, "the callers' Envoys never loaded the applied routes"
        time.sleep(0.1)


def test_fault_abort_from_the_policy(mesh: tuple[local.State, Path, Path], tmp_path: Path) -> None:
    state, state_dir, pipeline = mesh
    inputs, _ = _inputs(pipeline)
    _apply(state, state_dir, tmp_path, {"abort": {"percent": 100, "http_status": 503}})
    try:
        with local.gateway_credentials(state_dir, state).client(timeout=30.0) as client:
            responses = []
            for x in inputs:
                with pytest.raises(httpx.HTTPStatusError) as failed:
                    infer(client, state.layout.gateway_url, NAME, x)
                responses.append(failed.value.response)
        # stage 1's sidecar answers the hop into the last stage with the injected 503; stage 1 names it (502)
        assert {r.status_code for r in responses} == {502}
        assert all(LAST in r.text for r in responses)
        callers = [r.admin_socket for r in state.layout.of_stage(MIDDLE)]
        assert sum(_stats(a, "http.outbound.fault.").get("http.outbound.fault.aborts_injected", 0)
                   for a in callers) >= len(inputs)
    finally:
        _apply(state, state_dir, tmp_path, None)
    with local.gateway_credentials(state_dir, state).client(timeout=30.0) as client:
        infer(client, state.layout.gateway_url, NAME, inputs[0])  # the fault is gone with the policy


def test_fault_delay_from_the_policy(mesh: tuple[local.State, Path, Path], tmp_path: Path) -> None:
    state, state_dir, pipeline = mesh
    inputs, expected = _inputs(pipeline)
    delay_s = 0.3
    _apply(state, state_dir, tmp_path, {"delay": {"percent": 100, "fixed_delay_s": delay_s}})
    try:
        with local.gateway_credentials(state_dir, state).client(timeout=30.0) as client:
            for x, want in zip(inputs, expected, strict=True):
                out, _ = infer(client, state.layout.gateway_url, NAME, x)
                assert np.allclose(out["y"], want["y"], atol=1e-5, rtol=0)
        # Envoy's own count of the delays it held requests for (how long they took is a benchmark's figure)
        callers = [r.admin_socket for r in state.layout.of_stage(MIDDLE)]
        assert sum(_stats(a, "http.outbound.fault.").get("http.outbound.fault.delays_injected", 0)
                   for a in callers) >= len(inputs)
    finally:
        _apply(state, state_dir, tmp_path, None)


def _sigterm(pid: int) -> contextlib.AbstractContextManager[object]:
    os.kill(pid, signal.SIGTERM)
    return contextlib.nullcontext()


def test_a_stopping_replica_drains_without_loss(tmp_path: Path) -> None:
    """SIGTERM to one of two replicas' app under load: it answers not-ready first, its sidecar stops forwarding
    to it, and only then does it stop listening; nothing reaches its closed port, no request fails."""
    pipeline = tmp_path / "drain"
    write_tiny_pipeline(pipeline, name="drain", widths=(16, 64, 16, 4))
    policy = write_policy(tmp_path / "mesh.yaml", {"stages": {"drain-stage-1": {"replicas": 2}}})
    with running_mesh(pipeline, policy, tmp_path / ".mesh") as state:
        inputs, expected = _inputs(pipeline)
        victim = state.layout.of_stage("drain-stage-1")[1]
        app = next(p for p in state.procs if p.name == victim.name)
        outcomes = fault_under_load(mesh_sender(state, inputs, expected), lambda: _sigterm(app.pid),
                                    rate=10.0, before_s=1.0, fault_s=local.DRAIN_DELAY_S + 2.0, after_s=1.0,
                                    new_client=gateway_client(local.gateway_credentials(tmp_path / ".mesh", state)))
        assert [o.error for o in outcomes if o.error] == []
        stats = _stats(victim.admin_socket, f"cluster.{APP_CLUSTER}.")
        assert stats[f"cluster.{APP_CLUSTER}.health_check.failure"] > 0, stats  # it saw the app go not-ready
        assert stats[f"cluster.{APP_CLUSTER}.upstream_cx_connect_fail"] == 0, stats  # and never its closed port
        assert stats[f"cluster.{APP_CLUSTER}.upstream_rq_2xx"] > 0, stats  # it did serve before
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(app.pid):
            time.sleep(0.1)
        assert not _alive(app.pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
