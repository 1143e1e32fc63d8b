"""Two replicas of a middle stage with multi-MB activations under a steady load; one replica (its app and
its sidecar, as a pod) dies by SIGKILL: Envoy's retries and outlier detection hide it from every client."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mesh import local
from mesh.v2client import infer
from tests.mesh.local_mesh import mesh_cli, running_mesh, write_policy
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
    with running_mesh(pipeline, policy, tmp / ".mesh") as state:
        yield state, tmp / ".mesh", pipeline


def _stat(admin_port: int, name: str) -> int:
    """One counter from an Envoy's admin /stats (access logs are buffered, and lost with a SIGKILL)."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats", params={"filter": f"^{name}$"}, timeout=5.0).text
    values = [int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.startswith(name + ":")]
    assert len(values) == 1, text
    return values[0]


def test_activation_is_larger_than_envoy_default_buffer(mesh: tuple[local.State, Path, Path]) -> None:
    state, _, _ = mesh
    middle = state.policy.stage(MIDDLE)
    assert middle.activation_bytes == 4 * WIDTH > 1 << 20
    assert middle.buffer_limit_bytes >= middle.activation_bytes
    assert len(state.layout.of_stage(MIDDLE)) == 2


def test_sigkill_of_one_replica_loses_no_request(mesh: tuple[local.State, Path, Path]) -> None:
    state, state_dir, pipeline = mesh
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
        with httpx.Client(timeout=60.0) as client:
            i = k
            while not stop.is_set():
                phase = "after" if killed.is_set() else "before"
                try:
                    out, _ = infer(client, state.layout.gateway_url, "wide", {"x": inputs[i % len(inputs)]})
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
    admin_of = {r.name: r.admin_port for r in state.layout.replicas}
    victim = state.layout.of_stage(MIDDLE)[1].name
    victims = [p for p in state.procs if p.name in (victim, f"{victim}-sidecar")]
    deadline = time.monotonic() + DEADLINE_S
    try:
        while counts["before"] < BEFORE_KILL and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        victim_served = _stat(admin_of[victim], "http.inbound.downstream_rq_2xx")
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        killed.set()
        while counts["after"] < AFTER_KILL and time.monotonic() < deadline and not failures:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
    assert failures == []
    assert counts["before"] >= BEFORE_KILL and counts["after"] >= AFTER_KILL, counts
    # The victim did take its share of the load before it died (least-request balancing over two replicas),
    # and the callers' sidecars retried what the dead replica failed.
    assert victim_served > 0
    callers = [r.name for r in state.layout.of_stage("wide-stage-0")]
    retries = sum(_stat(admin_of[c], f"cluster.outbound|v1|{MIDDLE}.upstream_rq_retry") for c in callers)
    assert retries > 0

    status = mesh_cli("status", "--state-dir", str(state_dir))
    assert status.returncode == 1
    assert victim in status.stderr and f"{victim}-sidecar" in status.stderr
