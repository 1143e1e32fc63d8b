"""KServe v2 gRPC through the local mesh's gateway (real Envoy): tritonclient.grpc unchanged, the bad-input codes
passed through, and the gateway retrying UNAVAILABLE on the other replica of the first stage while one drains."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import local, sockets
from mesh.envoy_grpc import GATEWAY_GRPC
from model_export.manifest import Manifest
from stage_service.settings import GATEWAY_HEADER
from tests.mesh.local_mesh import running_mesh, write_policy

FIRST = "tiny-stage-0"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh-grpc") / ".mesh"


@pytest.fixture(scope="module")
def mesh(tiny_pipeline: tuple[Path, Manifest], state_dir: Path) -> Iterator[local.State]:
    policy = write_policy(state_dir.parent / "mesh.yaml", {"stages": {FIRST: {"replicas": 2}}})
    with running_mesh(tiny_pipeline[0], policy, state_dir) as state:
        yield state


@pytest.fixture(scope="module")
def gateway(mesh: local.State, state_dir: Path) -> local.GatewayCredentials:
    return local.gateway_credentials(state_dir, mesh, "tests")


@pytest.fixture(scope="module")
def auth(gateway: local.GatewayCredentials) -> dict[str, str]:
    """The token, as gRPC metadata (Authorization: Bearer ...)."""
    return gateway.headers


def _input(x: np.ndarray, name: str = "x") -> list[triton.InferInput]:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _client(gateway: local.GatewayCredentials) -> triton.InferenceServerClient:
    """A client that checks the gateway's certificate against the mesh's CA."""
    assert gateway.grpc_address is not None
    return triton.InferenceServerClient(gateway.grpc_address, ssl=True, root_certificates=str(gateway.ca))


def _stat(admin_socket: str, name: str) -> int:
    text = sockets.get(admin_socket, "/stats", filter=f"^{name}$").text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.startswith(name + ":"))


def test_tritonclient_grpc_through_the_gateway(mesh: local.State, gateway: local.GatewayCredentials,
                                               auth: dict[str, str], tiny_pipeline: tuple[Path, Manifest]) -> None:
    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_pipeline[0] / "model.onnx")).run(None, {"x": x})[0]
    client = _client(gateway)
    try:
        assert client.is_server_live(headers=auth) and client.is_server_ready(headers=auth)
        assert client.is_model_ready("tiny", headers=auth)
        meta = client.get_model_metadata("tiny", headers=auth)
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("x", [-1, 16])]
        result = client.infer("tiny", _input(x), request_id="through-gateway", headers=auth)
        np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-5, rtol=0)
        assert result.get_response().id == "through-gateway"
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", _input(np.zeros((1, 15), np.float32)), headers=auth)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "x" in (info.value.message() or "")
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", _input(np.zeros((1, 16), np.float32), "nope"), headers=auth)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "nope" in (info.value.message() or "")
    finally:
        client.close()
    # a bad input is not retried: it would only fail again
    assert _stat(mesh.layout.gateway_admin_socket, f"http.{GATEWAY_GRPC}.downstream_rq_completed") >= 5


def test_the_gateway_reaches_only_the_pipeline_over_grpc(mesh: local.State, gateway: local.GatewayCredentials,
                                                         auth: dict[str, str]) -> None:
    """As over REST: the first stage's own model name is not a client's to call (the gateway marks each call, and
    the stage refuses its name to marked calls, whatever mark a client sent), and a service other than KServe v2's
    has no route (UNIMPLEMENTED, as at an Istio gateway), rather than the sidecar's authorization refusal."""
    client = _client(gateway)
    x = np.zeros((1, 16), np.float32)
    try:
        for forged in ({}, {GATEWAY_HEADER: ""}, {GATEWAY_HEADER: "false"}):
            with pytest.raises(InferenceServerException) as info:
                client.infer(FIRST, _input(x), headers={**auth, **forged})
            assert info.value.status() == "StatusCode.NOT_FOUND", info.value
            assert "serves 'tiny'" in (info.value.message() or "")
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(FIRST, headers=auth)
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert client.infer("tiny", _input(x), headers=auth).as_numpy("y").shape == (1, 4)
    finally:
        client.close()
    assert gateway.grpc_address is not None
    credentials = grpc.ssl_channel_credentials(Path(gateway.ca).read_bytes())
    with grpc.secure_channel(gateway.grpc_address, credentials) as channel:
        health = channel.unary_unary("/grpc.health.v1.Health/Check")
        for metadata in (list(auth.items()), []):  # the token is asked only where Istio's DENY rule asks it
            with pytest.raises(grpc.RpcError) as error:
                health(b"", metadata=metadata, timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED, error.value
            assert "/inference.GRPCInferenceService/" in (error.value.details() or "")
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, error.value


def test_gateway_retries_unavailable_while_a_replica_drains(mesh: local.State, gateway: local.GatewayCredentials,
                                                            auth: dict[str, str]) -> None:
    """SIGTERM one replica of the first stage: it answers UNAVAILABLE while it drains, then stops listening;
    the gateway retries each such call on the other replica, so no client call fails."""
    victim = next(p for p in mesh.procs if p.role == "app" and p.stage == FIRST)
    failures: list[str] = []
    done = threading.Event()
    calls = [0]

    def load() -> None:
        client = _client(gateway)
        x = np.zeros((1, 16), np.float32)
        try:
            while not done.is_set():
                try:
                    client.infer("tiny", _input(x), headers=auth)
                    calls[0] += 1
                except InferenceServerException as exc:
                    failures.append(f"{exc.status()}: {exc.message()}")
        finally:
            client.close()

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    retries_before = _stat(mesh.layout.gateway_admin_socket, f"cluster.outbound|v1|{FIRST}|grpc.upstream_rq_retry")
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGTERM)
    time.sleep(local.DRAIN_DELAY_S + 2.0)
    done.set()
    for t in threads:
        t.join(30)
    retries = _stat(mesh.layout.gateway_admin_socket, f"cluster.outbound|v1|{FIRST}|grpc.upstream_rq_retry")
    assert failures == [], failures[:5]
    assert calls[0] > 20
    assert retries > retries_before, "no call met the draining replica: the test proved nothing"
