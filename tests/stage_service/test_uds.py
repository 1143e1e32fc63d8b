"""A stage on Unix domain sockets (STAGE_UDS, STAGE_GRPC_UDS, STAGE_NEXT_UDS), as the local mesh runs it: the
whole tiny chain, each stage listening on a socket and forwarding to the next one's, with no TCP port at all."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from model_export.manifest import Manifest
from stage_service.launch import StageProcess, free_port, launch, stage_env
from stage_service.supervisor import wait_ready
from tests.listeners import tcp_listening_ports, unix_listening_paths

NAMES = ["tiny-stage-0", "tiny-stage-1", "tiny-stage-2"]


def _uds_ready(socket: str) -> Callable[[], bool]:
    def ready() -> bool:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=1.0) as client:
            return client.get("http://localhost/v2/health/ready").status_code == 200
    return ready


@pytest.fixture(scope="module")
def uds_chain(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[tuple[list[StageProcess], Path]]:
    manifest = tiny_pipeline[0] / "pipeline.json"
    sockets = tmp_path_factory.mktemp("uds")
    stages: list[StageProcess] = []
    try:
        for i, name in enumerate(NAMES):
            extra = {"STAGE_UDS": str(sockets / f"{i}.app")}
            if i == 0:
                extra["STAGE_GRPC_UDS"] = str(sockets / "0.grpc")
            next_url = None
            if i + 1 < len(NAMES):  # the next stage by name; the socket is the way there
                next_url, extra["STAGE_NEXT_UDS"] = f"http://{NAMES[i + 1]}", str(sockets / f"{i + 1}.app")
            # STAGE_PORT is set (a free port) yet unused: the socket takes its place
            stages.append(launch(stage_env(manifest, name, free_port(), next_url, extra), name, i, sockets))
        wait_ready([s.target(_uds_ready(str(sockets / f"{i}.app"))) for i, s in enumerate(stages)], 60.0)
        yield stages, sockets
    finally:
        for stage in stages:
            stage.stop(signal.SIGTERM)


def test_the_chain_answers_over_sockets(uds_chain: tuple[list[StageProcess], Path],
                                        reference: Callable[..., np.ndarray]) -> None:
    _, sockets = uds_chain
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sockets / "0.app")), timeout=30.0) as client:
        answer = client.post("http://localhost/v2/models/tiny/infer", json=body)
    assert answer.status_code == 200, answer.text
    y = np.asarray(answer.json()["outputs"][0]["data"], np.float32).reshape(2, 4)
    np.testing.assert_allclose(y, reference(x), atol=1e-5, rtol=0)


def test_grpc_on_a_socket(uds_chain: tuple[list[StageProcess], Path], reference: Callable[..., np.ndarray]) -> None:
    _, sockets = uds_chain
    x = np.random.default_rng(4).standard_normal((1, 16)).astype(np.float32)
    client = triton.InferenceServerClient(f"unix:{sockets / '0.grpc'}")
    try:
        tensor = triton.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("tiny", [tensor])
    finally:
        client.close()
    np.testing.assert_allclose(result.as_numpy("y"), reference(x), atol=1e-5, rtol=0)


def test_no_stage_listens_on_tcp(uds_chain: tuple[list[StageProcess], Path]) -> None:
    stages, sockets = uds_chain
    for i, stage in enumerate(stages):
        assert tcp_listening_ports(stage.pid) == set(), NAMES[i]
        expected = {str(sockets / f"{i}.app")} | ({str(sockets / "0.grpc")} if i == 0 else set())
        assert unix_listening_paths(stage.pid) == expected, NAMES[i]
