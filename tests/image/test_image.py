"""The stage image, built and run: `make image`'s build of the CPU variant, two stage containers of a split
pipeline mounted read-only, served as the cluster runs them (UID 10001, read-only root, no capabilities)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from model_export.manifest import Manifest
from stage_service.launch import free_port
from tests.image.build_context import context_files
from tests.image.containers import (
    STAGE_UID,
    BuiltImage,
    StageContainer,
    docker,
    process_uids,
    remove,
    run_stage,
    wait_ready,
    wait_until,
)
from tests.stage_service.procs import start_fake_stage

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]
HOLD = {"x-pipeline-test-hold": "1"}
EXPORT_STACK = {"tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "keras"}
X = np.random.default_rng(11).standard_normal((3, 16)).astype(np.float32)


def infer(container: StageContainer, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"id": "boxed", "inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape),
                                       "data": X.ravel().tolist()}]}
    return httpx.post(f"{container.url}/v2/models/{model}/infer", json=body, headers=headers or {}, timeout=90)


def output_y(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (y,) = [o for o in response.json()["outputs"] if o["name"] == "y"]
    return np.asarray(y["data"], np.float32).reshape(y["shape"])


@pytest.fixture(scope="module")
def whole_y(tiny_pipeline: tuple[Path, Manifest]) -> np.ndarray:
    directory, _ = tiny_pipeline
    return ort.InferenceSession(str(directory / "model.onnx")).run(None, {"x": X})[0]


def test_two_stage_containers_serve_the_whole_model(chain: list[StageContainer], whole_y: np.ndarray) -> None:
    first, last = chain
    for container in chain:
        ready = httpx.get(f"{container.url}/v2/models/{container.stage}/ready", timeout=5)
        assert ready.status_code == 200, container.logs()
    response = infer(first, "boxed")
    np.testing.assert_allclose(output_y(response), whole_y, atol=1e-5, rtol=0)
    assert [e.split("=")[0] for e in response.headers["x-stage-timing"].split(",")] == \
        ["boxed-stage-0/v1", "boxed-stage-1/v1"]  # the answer went through both containers


def test_every_process_runs_as_uid_10001(chain: list[StageContainer]) -> None:
    for container in chain:
        uids = process_uids(container)
        assert uids and set(uids) == {STAGE_UID}, (container.name, uids)


def test_the_image_holds_the_serving_code_and_nothing_of_the_export_stack(image: BuiltImage) -> None:
    probe = (
        "import importlib.metadata as md, importlib.util as u, json\n"
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in md.distributions()),\n"
        "  'modules': [m for m in ('tensorflow', 'tf2onnx', 'onnx', 'keras') if u.find_spec(m)],\n"
        "  'files': sorted(str(f) for f in md.files('meshpipe') if str(f).endswith('.py'))}))\n"
    )
    found = json.loads(docker("run", "--rm", "--network", "none", "--entrypoint", "python", image.id, "-c", probe))
    assert "onnxruntime" in found["dists"] and "fastapi" in found["dists"]
    assert sorted(EXPORT_STACK & set(found["dists"])) == [] and found["modules"] == []
    # what Docker copied and installed is exactly what the context test reads from .dockerignore
    assert found["files"] == sorted(f for f in context_files() if f.endswith(".py"))


def test_docker_stop_answers_the_requests_in_flight_and_exits_0(image: BuiltImage, run_id: str, pipeline: Path,
                                                                chain: list[StageContainer],
                                                                whole_y: np.ndarray) -> None:
    """SIGTERM from `docker stop` reaches python as PID 1: it stops accepting, finishes what it holds, exits 0."""
    fake = start_fake_stage(chain[1].url)  # holds requests on their way to the last stage
    front = run_stage(image.id, run_id, pipeline, "boxed-stage-0", free_port(), next_url=fake.url)
    n = 4
    try:
        wait_ready(front)
        with ThreadPoolExecutor(n + 1) as pool:
            futures = [pool.submit(infer, front, "boxed", HOLD) for _ in range(n)]
            try:
                wait_until(lambda: httpx.get(f"{fake.url}/_fake/held").json()["held"] == n, f"{n} requests held")
                stopping = pool.submit(docker, "stop", "--time", "60", front.name, timeout=90)
                wait_until(lambda: refuses(front), "the stage stops accepting connections")
                assert front.state("Running") == "true"  # still draining
            finally:
                httpx.post(f"{fake.url}/_fake/release")
            responses = [f.result() for f in futures]
            stopping.result()
        for response in responses:
            np.testing.assert_allclose(output_y(response), whole_y, atol=1e-5, rtol=0)
        assert front.state("ExitCode") == "0", front.logs()
    finally:
        fake.stop()
        remove(front)


def test_image_size_is_reported(image: BuiltImage) -> None:
    assert 50_000_000 < image.size_bytes < 2_000_000_000, image.report
    assert f"{image.size_bytes // 1_000_000} MB" in image.report


def refuses(container: StageContainer) -> bool:
    try:
        httpx.get(f"{container.url}/v2/health/live", timeout=1)
        return False
    except httpx.HTTPError:
        return True
