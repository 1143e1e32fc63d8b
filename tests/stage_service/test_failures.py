"""When the next stage is down, slow or held, and when the process is told to stop.

tiny-stage-1 processes forward to a test proxy (`fake_stage.py`) in front of a real tiny-stage-2; the proxy
holds requests marked `x-pipeline-test-hold: 1` until released, so requests stay in flight without sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_export.manifest import Manifest
from stage_service.protocol import decode_response, encode_request
from tests.stage_service.procs import StageProcess, free_port, start_fake_stage, start_stage, stop_all

HOLD = {"x-pipeline-test-hold": "1"}
H1 = np.random.default_rng(3).random((2, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("failure-logs")


@pytest.fixture(scope="module")
def manifest_path(tiny_pipeline: tuple[Path, Manifest]) -> Path:
    return tiny_pipeline[0] / "pipeline.json"


@pytest.fixture(scope="module")
def fake(manifest_path: Path, logs: Path) -> Iterator[StageProcess]:
    """A real tiny-stage-2 behind the holding proxy; yields the proxy."""
    last = start_stage(manifest_path, "tiny-stage-2", log_dir=logs)
    proxy = start_fake_stage(last.url, log_dir=logs)
    yield proxy
    stop_all([proxy, last])


def release(fake: StageProcess) -> int:
    return int(httpx.post(f"{fake.url}/_fake/release").json()["released"])


def infer_h1(stage: StageProcess, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    body, length = encode_request({"h1": H1})
    return httpx.post(f"{stage.url}/v2/models/tiny-stage-1/infer", content=body, timeout=timeout,
                      headers={"Inference-Header-Content-Length": str(length), **(headers or {})})


def gauge(stage: StageProcess, name: str) -> float:
    for line in httpx.get(f"{stage.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def expected_y(reference: Callable[..., np.ndarray]) -> np.ndarray:
    return reference(H1, "stage-1.onnx", "stage-2.onnx")


def test_next_stage_down_is_502_naming_it_but_not_its_url(manifest_path: Path, logs: Path) -> None:
    """The body names the stage; the internal URL goes to the log only (issue 14, row 10)."""
    dead = f"http://127.0.0.1:{free_port()}"
    stage = start_stage(manifest_path, "tiny-stage-1", next_url=dead, log_dir=logs)
    try:
        r = infer_h1(stage)
        assert r.status_code == 502
        assert "tiny-stage-2" in r.json()["error"]
        assert "127.0.0.1" not in r.text and "http://" not in r.text
        assert stage.alive()
    finally:
        assert stage.stop() == 0
    assert dead in stage.log()


def test_next_stage_slow_is_504_naming_it(manifest_path: Path, logs: Path, fake: StageProcess) -> None:
    stage = start_stage(manifest_path, "tiny-stage-1", next_url=fake.url, env={"STAGE_TIMEOUT_S": "1"},
                        log_dir=logs)
    try:
        r = infer_h1(stage, HOLD)
        assert r.status_code == 504
        assert "tiny-stage-2" in r.json()["error"] and "1 s" in r.json()["error"]
    finally:
        release(fake)
        assert stage.stop() == 0


@pytest.fixture(scope="module")
def guarded(manifest_path: Path, logs: Path, fake: StageProcess) -> Iterator[StageProcess]:
    """tiny-stage-1 with STAGE_MAX_INFLIGHT=2, forwarding through the proxy."""
    stage = start_stage(manifest_path, "tiny-stage-1", next_url=fake.url, env={"STAGE_MAX_INFLIGHT": "2"},
                        log_dir=logs)
    yield stage
    assert stage.stop() == 0


def test_tracing_and_pipeline_headers_are_propagated(guarded: StageProcess, fake: StageProcess,
                                                     reference: Callable[..., np.ndarray]) -> None:
    sent = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "vendor=abc",
        "x-request-id": "req-123",
        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-spanid": "e457b5a2e4d86bd1",
        "x-b3-sampled": "1",
        "x-pipeline-tenant": "blue",
    }
    r = infer_h1(guarded, {**sent, "x-unrelated": "no", "authorization": "Bearer secret"})
    assert r.status_code == 200, r.text
    _, outputs = decode_response(r.content, r.headers.get("Inference-Header-Content-Length"))
    np.testing.assert_allclose(outputs["y"], expected_y(reference), atol=1e-5, rtol=0)
    seen = httpx.get(f"{fake.url}/_fake/seen").json()
    for key, value in sent.items():
        assert seen.get(key) == value, key
    assert "x-unrelated" not in seen and "authorization" not in seen
    assert seen["inference-header-content-length"].isdigit()  # stage-to-stage is binary


def test_over_max_inflight_is_503_at_once(guarded: StageProcess, fake: StageProcess, manifest_path: Path,
                                          logs: Path, reference: Callable[..., np.ndarray]) -> None:
    front = start_stage(manifest_path, "tiny-stage-0", next_url=guarded.url, log_dir=logs)
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(infer_h1, guarded, HOLD) for _ in range(2)]
        try:
            wait_until(lambda: gauge(guarded, "stage_inflight_requests") == 2, "2 requests in flight")
            wait_until(lambda: httpx.get(f"{fake.url}/_fake/held").json()["held"] == 2, "2 requests held")
            r = infer_h1(guarded)
            assert r.status_code == 503
            assert "STAGE_MAX_INFLIGHT=2" in r.json()["error"]
            # The stage in front gets that 503 as the next stage's answer and turns it into 502: the mesh
            # retries 503 at the hop next to the overload, and must not retry it again at every outer hop.
            body, length = encode_request({"x": np.zeros((1, 16), np.float32)})
            r0 = httpx.post(f"{front.url}/v2/models/tiny/infer", content=body, timeout=60,
                            headers={"Inference-Header-Content-Length": str(length)})
            assert r0.status_code == 502
            assert "tiny-stage-1" in r0.json()["error"] and "answered 503" in r0.json()["error"]
        finally:
            release(fake)
            assert front.stop() == 0
        for future in held:
            response = future.result()
            assert response.status_code == 200, response.text
    assert infer_h1(guarded).status_code == 200  # the slots are free again


def test_sigterm_with_requests_in_flight_loses_none(manifest_path: Path, logs: Path, fake: StageProcess,
                                                    reference: Callable[..., np.ndarray]) -> None:
    stage = start_stage(manifest_path, "tiny-stage-1", next_url=fake.url, log_dir=logs)
    n = 4
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(infer_h1, stage, HOLD) for _ in range(n)]
        try:
            wait_until(lambda: httpx.get(f"{fake.url}/_fake/held").json()["held"] == n, f"{n} requests held")
            stage.send()  # SIGTERM while all n wait on the next stage

            def refusing() -> bool:
                try:
                    httpx.get(f"{stage.url}/v2/health/live", timeout=1)
                    return False
                except httpx.HTTPError:
                    return True

            wait_until(refusing, "the stage stops accepting connections")
            assert stage.alive()  # still draining
        finally:
            release(fake)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    for r in responses:
        _, outputs = decode_response(r.content, r.headers.get("Inference-Header-Content-Length"))
        np.testing.assert_allclose(outputs["y"], expected_y(reference), atol=1e-5, rtol=0)
    assert stage.stop() == 0, stage.log()
