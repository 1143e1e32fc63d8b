"""The local mesh on real Envoy with the tiny pipeline: correctness through the gateway, mTLS and RBAC on
the sidecars, an 80/20 canary, a policy change without restart, status/logs/down, and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mesh import local, procs
from mesh.v2client import STAGE_TIMING, decode, encode, infer, stage_timing
from model_export.manifest import Manifest
from stage_service.settings import GATEWAY_HEADER
from tests.mesh.local_mesh import gateway_client, mesh_cli, mtls_client, processes_of, running_mesh, write_policy

CANARY_STAGE = "tiny-stage-1"
CANARY_REQUESTS = 1000


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline plus a v2 of its middle stage (same weights, another file, as a retrained one)."""
    directory = tmp_path_factory.mktemp("mesh-tiny") / "tiny"
    shutil.copytree(tiny_pipeline[0], directory)
    shutil.copy(directory / "stage-1.onnx", directory / "stage-1-v2.onnx")
    return directory


def _policy(path: Path, v1: int, v2: int) -> Path:
    return write_policy(path, {
        "namespace": "tiny-ns",
        "stages": {CANARY_STAGE: {"versions": [{"name": "v1", "weight": v1},
                                               {"name": "v2", "weight": v2, "file": "stage-1-v2.onnx"}]}},
    })


@pytest.fixture(scope="module")
def mesh(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[local.State, Path]]:
    tmp = tmp_path_factory.mktemp("mesh-tiny-state")
    state_dir = tmp / ".mesh"
    with running_mesh(pipeline, _policy(tmp / "mesh.yaml", 80, 20), state_dir) as state:
        yield state, state_dir


def _whole(pipeline: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(pipeline / "model.onnx")).run(None, {"x": x})[0]


def test_binary_and_json_through_gateway_equal_whole_model(mesh: tuple[local.State, Path], pipeline: Path) -> None:
    state, state_dir = mesh
    x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    want = _whole(pipeline, x)
    with gateway_client(state_dir) as client:
        for binary in (True, False):
            outputs, response = infer(client, state.layout.gateway_url, "tiny", {"x": x}, binary=binary)
            np.testing.assert_allclose(outputs["y"], want, atol=1e-5, rtol=0)
            stages = [s for s, _, _ in stage_timing(response.headers.get(STAGE_TIMING))]
            assert stages == ["tiny-stage-0", "tiny-stage-1", "tiny-stage-2"]


def test_curl_json_through_gateway(mesh: tuple[local.State, Path], pipeline: Path) -> None:
    """The command the README shows: the mesh's CA and a token from `mesh token`."""
    state, state_dir = mesh
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]})
    token = mesh_cli("token", "--subject", "curl", "--state-dir", str(state_dir)).stdout.strip()
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--cacert", str(state_dir / "pki" / "ca.pem"),
         "-H", f"authorization: Bearer {token}", "-H", "content-type: application/json", "-d", body,
         f"{state.layout.gateway_url}/v2/models/tiny/infer"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    out = json.loads(result.stdout)["outputs"][0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), _whole(pipeline, x),
                               atol=1e-5, rtol=0)


def test_plaintext_to_a_sidecar_fails(mesh: tuple[local.State, Path]) -> None:
    state, _ = mesh
    replica = state.layout.of_stage(CANARY_STAGE)[0]
    with httpx.Client(timeout=5.0) as client, pytest.raises(httpx.TransportError):
        client.get(f"http://127.0.0.1:{replica.inbound_port}/v2/health/ready")


def test_rbac_admits_only_the_previous_stage(mesh: tuple[local.State, Path], tmp_path: Path) -> None:
    """Stage 1's sidecar: stage 0's identity gets through, stage 2's and the gateway's get 403."""
    state, state_dir = mesh
    replica = state.layout.of_stage(CANARY_STAGE)[0]
    url = f"https://127.0.0.1:{replica.inbound_port}/v2/models/{CANARY_STAGE}/infer"
    h = np.ones((1, 32), np.float32)
    body, headers = encode({"h1": h})
    outcomes = {}
    for who in ("tiny-stage-0", "tiny-stage-2"):
        with mtls_client(state_dir, f"spiffe://cluster.local/ns/tiny-ns/sa/{who}", tmp_path) as client:
            outcomes[who] = client.post(url, content=body, headers=headers)
    with mtls_client(state_dir, state.policy.gateway_identity.spiffe_id, tmp_path) as client:
        outcomes["gateway"] = client.post(url, content=body, headers=headers)
    # Right service account, wrong namespace: not the previous stage either.
    with mtls_client(state_dir, "spiffe://cluster.local/ns/other/sa/tiny-stage-0", tmp_path) as client:
        outcomes["other-ns"] = client.post(url, content=body, headers=headers)
    assert outcomes["tiny-stage-0"].status_code == 200, outcomes["tiny-stage-0"].text
    assert {k: r.status_code for k, r in outcomes.items() if k != "tiny-stage-0"} == \
        {"tiny-stage-2": 403, "gateway": 403, "other-ns": 403}


def test_the_first_stage_admits_the_gateway_only_with_its_mark(mesh: tuple[local.State, Path],
                                                                 pipeline: Path, tmp_path: Path) -> None:
    """Stage 0's sidecar: the gateway's identity without the mark the gateway sets (as another route of a shared
    ingress gateway would come) gets 403; with it, the pipeline answers; the mark from another identity, 403."""
    state, state_dir = mesh
    replica = state.layout.of_stage("tiny-stage-0")[0]
    url = f"https://127.0.0.1:{replica.inbound_port}/v2/models/tiny/infer"
    x = np.ones((1, 16), np.float32)
    body, headers = encode({"x": x})
    marked = {**headers, GATEWAY_HEADER: "true"}
    gateway_id = state.policy.gateway_identity.spiffe_id
    with mtls_client(state_dir, gateway_id, tmp_path) as client:
        unmarked, forged_false, admitted = (client.post(url, content=body, headers=h) for h in
                                            (headers, {**headers, GATEWAY_HEADER: "false"}, marked))
    with mtls_client(state_dir, "spiffe://cluster.local/ns/tiny-ns/sa/tiny-stage-1", tmp_path) as client:
        other = client.post(url, content=body, headers=marked)
    assert (unmarked.status_code, forged_false.status_code, other.status_code) == (403, 403, 403)
    assert admitted.status_code == 200, admitted.text
    np.testing.assert_allclose(decode(admitted)["y"], _whole(pipeline, x), atol=1e-5, rtol=0)


def _served_versions(state_dir: Path, n: int) -> Counter[str]:
    x = np.ones((1, 16), np.float32)
    body, headers = encode({"x": x})

    def one(client: httpx.Client) -> str:
        response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return next(v for s, v, _ in stage_timing(response.headers[STAGE_TIMING]) if s == CANARY_STAGE)

    gateway = local.gateway_credentials(state_dir, subject="tests")
    with gateway.client(base_url=gateway.url, timeout=30.0) as client, ThreadPoolExecutor(4) as pool:
        return Counter(pool.map(lambda _: one(client), range(n)))


def test_canary_split_80_20(mesh: tuple[local.State, Path]) -> None:
    _, state_dir = mesh
    served = _served_versions(state_dir, CANARY_REQUESTS)
    assert sum(served.values()) == CANARY_REQUESTS
    share_v2 = 100 * served["v2"] / CANARY_REQUESTS
    assert 15 <= share_v2 <= 25, served


def test_policy_change_applies_without_restart(mesh: tuple[local.State, Path], tmp_path: Path) -> None:
    state, state_dir = mesh
    pids = {p.name: p.pid for p in state.procs}
    try:
        result = mesh_cli("apply", "--policy", str(_policy(tmp_path / "all-v2.yaml", 0, 100)),
                          "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        # Envoy reloads its watched files within moments; the check is on what it serves, not on time.
        served: Counter[str] = Counter()
        for _ in range(100):
            served = _served_versions(state_dir, 20)
            if served == Counter(v2=20):
                break
        assert served == Counter(v2=20)
        after = local.read_state(state_dir)
        assert after is not None and {p.name: p.pid for p in after.procs} == pids
        assert all(procs.alive(p) for p in after.procs)
    finally:
        assert mesh_cli("apply", "--policy", str(_policy(tmp_path / "back.yaml", 80, 20)),
                        "--state-dir", str(state_dir)).returncode == 0


def test_apply_refuses_a_change_of_replicas(mesh: tuple[local.State, Path], tmp_path: Path) -> None:
    _, state_dir = mesh
    policy = write_policy(tmp_path / "more.yaml", {"namespace": "tiny-ns", "defaults": {"replicas": 2}})
    result = mesh_cli("apply", "--policy", str(policy), "--state-dir", str(state_dir))
    assert result.returncode != 0
    assert "down" in result.stderr


def test_status_and_logs(mesh: tuple[local.State, Path]) -> None:
    state, state_dir = mesh
    result = mesh_cli("status", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    for p in state.procs:
        assert p.name in result.stdout
    logs = mesh_cli("logs", "gateway", "--state-dir", str(state_dir))
    assert logs.returncode == 0 and "POST /v2/models/tiny/infer" in logs.stdout
    logs = mesh_cli("logs", "no-such-stage", "--state-dir", str(state_dir))
    assert logs.returncode != 0 and "unknown stage" in logs.stderr


def test_second_up_refused_while_running(mesh: tuple[local.State, Path], pipeline: Path) -> None:
    state, state_dir = mesh
    before = sorted(processes_of(state_dir))
    result = mesh_cli("up", "--pipeline", str(pipeline), "--detach", "--gateway-port", "0",
                      "--state-dir", str(state_dir))
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert sorted(processes_of(state_dir)) == before
    assert len(before) == len(state.procs)


def test_z_down_leaves_nothing(mesh: tuple[local.State, Path]) -> None:
    """Last in the module: down stops every process; the fixture's own down then finds nothing."""
    state, state_dir = mesh
    assert len(processes_of(state_dir)) == 10  # 4 apps (stage 1 in two versions), 4 sidecars, gateway, keeper
    result = mesh_cli("down", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    assert processes_of(state_dir) == []
    assert not any(procs.alive(p) for p in state.procs)
    with httpx.Client(timeout=2.0) as client, pytest.raises(httpx.TransportError):
        client.get(f"{state.layout.gateway_url}/v2/health/ready")
