"""Two replicas of a middle stage with multi-MB activations under a steady load; one replica (its app and
its sidecar, as a pod) dies by SIGKILL: Envoy's retries and outlier detection hide it from every client."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mesh import local, sockets
from mesh.procs import alive as procs_alive
from mesh.v2client import infer
from tests.mesh.local_mesh import gateway_client, mesh_cli, running_mesh, write_policy
from tests.tiny import write_tiny_pipeline

WIDTH = 786432  # FP32 per sample into the middle stage: 3 MiB, three times Envoy's default buffer
MIDDLE = "wide-stage-1"
CLIENTS = 3
BEFORE_KILL = 30  # successful requests before the kill
AFTER_KILL = 90  # successful requests after it
DEADLINE_S = 120.0  # bound on the whole load, whatever happens


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[local.State, Path, Path]]:
    tmp = tmp_path_factory.mktemp("mesh-wide")
    pipeline = tmp / "wide"
    write_tiny_pipeline(pipeline, name="wide", widths=(16, WIDTH, 16, 4))
    policy = write_policy(tmp / "mesh.yaml", {"stages": {MIDDLE: {"replicas": 2}}})
    # no keeper: what is killed stays down, so only Envoy's retries and outlier detection hide it
    with running_mesh(pipeline, policy, tmp / ".mesh", "--no-restart") as state:
        yield state, tmp / ".mesh", pipeline


def _stat(admin_socket: str, name: str) -> int:
    """One counter from an Envoy's admin /stats (access logs are buffered, and lost with a SIGKILL)."""
    text = sockets.get(admin_socket, "/stats", filter=f"^{name}$").text
    values = [int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.startswith(name + ":")]
    assert len(values) == 1, text
    return values[0]


def test_activation_is_larger_than_envoy_default_buffer(mesh: tuple[local.State, Path, Path]) -> None:
    state, _, _ = mesh
    middle = state.policy.stage(MIDDLE)
    assert middle.activation_bytes == 4 * WIDTH > 1 << 20
    assert state.policy.hop_into(MIDDLE).upstream.buffer_limit_bytes >= middle.activation_bytes
    assert len(state.layout.of_stage(MIDDLE)) == 2


def _load_through_a_kill(state: local.State, state_dir: Path, pipeline: Path, name: str, victims: list[int],
                         before_kill: int, after_kill: int,
                         just_before_kill: Callable[[], None] = lambda: None) -> tuple[dict[str, int], list[str]]:
    """Steady load from CLIENTS clients; SIGKILL `victims` once `before_kill` requests succeeded; stop after
    `after_kill` more (or at DEADLINE_S). Returns the successes by phase and every failure."""
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(4)]
    whole = ort.InferenceSession(str(pipeline / "model.onnx"))
    expected = [whole.run(None, {"x": x})[0] for x in inputs]

    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()
    counts = {"before": 0, "after": 0}
    failures: list[str] = []

    def client_loop(k: int) -> None:
        with gateway_client(state_dir, timeout=60.0) as client:
            i = k
            while not stop.is_set():
                phase = "after" if killed.is_set() else "before"
                try:
                    out, _ = infer(client, state.layout.gateway_url, name, {"x": inputs[i % len(inputs)]})
                    ok = np.allclose(out["y"], expected[i % len(inputs)], atol=1e-5, rtol=0)
                    err = None if ok else "wrong output"
                except httpx.HTTPError as exc:
                    err = str(exc)
                with lock:
                    if err:
                        failures.append(f"{phase}: {err}")
                    else:
                        counts[phase] += 1
                i += CLIENTS

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        while counts["before"] < before_kill and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        just_before_kill()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed.set()
        while counts["after"] < after_kill and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
    return counts, failures


def test_sigkill_of_one_replica_loses_no_request(mesh: tuple[local.State, Path, Path]) -> None:
    state, state_dir, pipeline = mesh
    admin_of = {r.name: r.admin_socket for r in state.layout.replicas}
    victim = state.layout.of_stage(MIDDLE)[1].name
    victims = [p.pid for p in state.procs if p.name in (victim, f"{victim}-sidecar")]
    served: list[int] = []
    counts, failures = _load_through_a_kill(
        state, state_dir, pipeline, "wide", victims, BEFORE_KILL, AFTER_KILL,
        lambda: served.append(_stat(admin_of[victim], "http.inbound.downstream_rq_2xx")))
    assert failures == []
    assert counts["before"] >= BEFORE_KILL and counts["after"] >= AFTER_KILL, counts
    # The victim did take its share of the load before it died (least-request balancing over two replicas),
    # and the callers' sidecars retried what the dead replica failed.
    assert served and served[0] > 0
    callers = [r.name for r in state.layout.of_stage("wide-stage-0")]
    retries = sum(_stat(admin_of[c], f"cluster.outbound|v1|{MIDDLE}.upstream_rq_retry") for c in callers)
    assert retries > 0

    status = mesh_cli("status", "--state-dir", str(state_dir))
    assert status.returncode == 1
    assert victim in status.stderr and f"{victim}-sidecar" in status.stderr


def test_an_app_that_dies_behind_its_live_sidecar_loses_no_request(tmp_path: Path) -> None:
    """The common case in a cluster: the container crashes, the pod's sidecar lives on and answers 503."""
    pipeline = tmp_path / "crash"
    write_tiny_pipeline(pipeline, name="crash", widths=(16, 4096, 16, 4))
    policy = write_policy(tmp_path / "mesh.yaml", {"stages": {"crash-stage-1": {"replicas": 2}}})
    with running_mesh(pipeline, policy, tmp_path / ".mesh", "--no-restart") as state:
        victim = state.layout.of_stage("crash-stage-1")[1].name
        app = [p.pid for p in state.procs if p.name == victim]
        sidecar = next(p for p in state.procs if p.name == f"{victim}-sidecar")
        counts, failures = _load_through_a_kill(state, tmp_path / ".mesh", pipeline, "crash", app, 20, 60)
        assert failures == []
        assert counts["before"] >= 20 and counts["after"] >= 60, counts
        assert procs_alive(sidecar)  # only the app died
        admin = next(r.admin_socket for r in state.layout.replicas if r.name == victim)
        assert _stat(admin, "http.inbound.downstream_rq_5xx") > 0  # its sidecar did answer 5xx...
        callers = [r.admin_socket for r in state.layout.of_stage("crash-stage-0")]
        retried = sum(_stat(a, "cluster.outbound|v1|crash-stage-1.upstream_rq_retry") for a in callers)
        assert retried > 0  # ...and the callers retried those on the other replica
