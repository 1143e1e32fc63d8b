"""`mesh up` refuses bad inputs with one clear message and a non-zero exit, and leaves no process behind;
the generated Envoy configuration carries the resolved policy; the committed mesh.yaml fits the reference."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh import envoy_config, local
from mesh.layout import plan
from mesh.pki import CertPair
from mesh.plan import resolve
from mesh.policy import Policy, load_policy
from model_export.manifest import Manifest, load_manifest
from tests.mesh.local_mesh import REPO, mesh_cli, processes_of, write_policy


def _up(pipeline: Path, state_dir: Path, *extra: str) -> tuple[int, str]:
    result = mesh_cli("up", "--pipeline", str(pipeline), "--detach", "--state-dir", str(state_dir),
                      "--timeout", "60", *extra)
    assert processes_of(state_dir) == []
    assert not (state_dir / local.STATE_FILE).exists()
    return result.returncode, result.stderr


def test_missing_pipeline_dir(tmp_path: Path) -> None:
    rc, err = _up(tmp_path / "nowhere", tmp_path / ".mesh")
    assert rc != 0 and "does not exist" in err


def test_pipeline_given_as_a_file(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    rc, err = _up(tiny_pipeline[0] / "model.onnx", tmp_path / ".mesh")
    assert rc == 2 and "expects a pipeline directory (from `python -m model_export split`), got a file" in err


def test_invalid_policies(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    pipeline, _ = tiny_pipeline
    cases = {
        "sum to 100": {"stages": {"tiny-stage-1": {"versions": [{"name": "v1", "weight": 70},
                                                                {"name": "v2", "weight": 20}]}}},
        "unknown stage": {"stages": {"tiny-stage-9": {"replicas": 2}}},
        "timeouts must shrink": {"stages": {"tiny-stage-2": {"timeout_s": 60}}},
        "not valid YAML": "namespace: [unclosed",
    }
    for expected, policy in cases.items():
        path = tmp_path / "bad.yaml"
        if isinstance(policy, str):
            path.write_text(policy)
        else:
            write_policy(path, policy)
        rc, err = _up(pipeline, tmp_path / ".mesh", "--policy", str(path), "--gateway-port", "0")
        assert rc != 0 and expected in err, (expected, err)
        assert "Traceback" not in err


def test_gateway_port_in_use(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = _up(tiny_pipeline[0], tmp_path / ".mesh", "--gateway-port", str(port))
    assert rc != 0 and f"port {port}" in err and "in use" in err


def test_missing_canary_file(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p.yaml", {"stages": {"tiny-stage-0": {"versions": [
        {"name": "v1", "weight": 50}, {"name": "v2", "weight": 50, "file": "missing.onnx"}]}}})
    rc, err = _up(tiny_pipeline[0], tmp_path / ".mesh", "--policy", str(policy), "--gateway-port", "0")
    assert rc != 0 and "missing.onnx" in err


def test_a_stage_that_cannot_start_stops_everything(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """A stage file that does not match its sha256: that process exits, `up` names it and stops the rest."""
    pipeline = tmp_path / "tiny"
    shutil.copytree(tiny_pipeline[0], pipeline)
    shutil.copy(pipeline / "stage-0.onnx", pipeline / "stage-1.onnx")
    rc, err = _up(pipeline, tmp_path / ".mesh", "--gateway-port", "0")
    assert rc != 0 and "tiny-stage-1-v1-0 exited during start-up" in err


def test_status_and_down_with_nothing_running(tmp_path: Path) -> None:
    status = mesh_cli("status", "--state-dir", str(tmp_path / ".mesh"))
    assert status.returncode != 0 and "no mesh is running" in status.stderr
    down = mesh_cli("down", "--state-dir", str(tmp_path / ".mesh"))
    assert down.returncode == 0 and "no mesh is running" in down.stdout


def test_envoy_config_carries_the_policy(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    policy = Policy.model_validate({"namespace": "ns", "stages": {"tiny-stage-1": {
        "replicas": 2, "buffer_limit_bytes": 4 << 20, "retries": {"attempts": 2, "retry_on": ["reset", "503"]},
        "versions": [{"name": "v1", "weight": 80}, {"name": "v2", "weight": 20}]}}})
    resolved = resolve(policy, manifest)
    layout = plan(resolved, manifest.name, pipeline, gateway_port=0, socket_dir=tmp_path)
    pair = CertPair(tmp_path / "c.pem", tmp_path / "k.pem")
    caller = next(r for r in layout.replicas if r.stage == "tiny-stage-0")
    res = envoy_config.sidecar(layout, resolved, caller, pair, tmp_path / "ca.pem", tmp_path)
    outbound = next(r for r in res.routes if r["name"] == "outbound")["virtual_hosts"][0]["routes"][0]["route"]
    assert outbound["weighted_clusters"]["clusters"] == [
        {"name": "outbound|v1|tiny-stage-1", "weight": 80}, {"name": "outbound|v2|tiny-stage-1", "weight": 20}]
    assert outbound["retry_policy"]["num_retries"] == 2
    assert outbound["retry_policy"]["retry_on"] == "reset,retriable-status-codes"
    assert outbound["retry_policy"]["retriable_status_codes"] == [503]
    assert next(x for x in res.listeners if x["name"] == "outbound")["per_connection_buffer_limit_bytes"] == 4 << 20
    clusters = {c["name"]: c for c in res.clusters}
    assert clusters["outbound|v1|tiny-stage-1"]["per_connection_buffer_limit_bytes"] == 4 << 20
    assert len(clusters["outbound|v1|tiny-stage-1"]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    san = clusters["outbound|v2|tiny-stage-1"]["transport_socket"]["typed_config"]["common_tls_context"][
        "validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/ns/sa/tiny-stage-1"}}]
    callee = next(r for r in layout.replicas if r.stage == "tiny-stage-1")
    inbound = envoy_config.sidecar(layout, resolved, callee, pair, tmp_path / "ca.pem", tmp_path).listeners[0]
    rbac = inbound["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
    principals = rbac["rules"]["policies"]["allow-previous-hop"]["principals"]
    assert principals == [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/ns/sa/tiny-stage-0"}}}]


@pytest.mark.skipif(not (REPO / "examples" / "reference" / "pipeline.json").is_file(), reason="no reference")
def test_committed_mesh_yaml_fits_the_reference_pipeline() -> None:
    manifest = load_manifest(REPO / "examples" / "reference")
    resolved = resolve(load_policy(REPO / "mesh.yaml"), manifest)
    assert [s.name for s in resolved.stages] == [f"reference-stage-{i}" for i in range(4)]
    assert resolved.gateway.port == 8080


def test_foreground_up_tears_down_on_sigterm(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """Without --detach, `mesh up` stays in the foreground; SIGTERM (like Ctrl-C) stops everything."""
    state_dir = tmp_path / ".mesh"
    cli = subprocess.Popen([sys.executable, "-m", "mesh", "up", "--pipeline", str(tiny_pipeline[0]),
                            "--gateway-port", "0", "--state-dir", str(state_dir)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert cli.stdout is not None
        lines = []
        for line in cli.stdout:  # ends when the CLI exits, so a failed start cannot hang here
            lines.append(line)
            if "Ctrl-C stops the mesh" in line:
                break
        assert any("gateway: https://127.0.0.1:" in line for line in lines), "".join(lines)
        assert len(processes_of(state_dir)) == 8  # 3 apps, 3 sidecars, the gateway and the keeper
        cli.send_signal(signal.SIGTERM)
        rest, _ = cli.communicate(timeout=60)
        left = processes_of(state_dir)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if processes_of(state_dir):  # never leave a failed test's processes behind
            local.down(state_dir)
    assert cli.returncode == 0 and "stopped 8 processes" in rest, (cli.returncode, rest)
    assert left == []
