"""Property-based fuzzing of a real stage chain (issue 14, item 7): hypothesis builds JSON bodies, binary
framings, headers and raw bytes (the strategies in `benchmarks.fuzz_inputs`, which `make reliability` draws
from too), from near-valid to absurd; every answer must be below 500 (503 is deliberate: overload,
not ready), carry `{"error": ...}` when it is an error, and leave the kept-alive connection usable; the
processes stay alive and their memory bounded; a good request still gets the right answer afterwards.

The chain runs with 1 s header and body timeouts, so that a framing that leaves the server waiting ends
quickly (408). The examples are derandomized so that `make test` is repeatable; `MESHPIPE_FUZZ_EXAMPLES`
raises their number for a longer run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_inputs import header_names, header_values, json_values, often, raw_requests, requests
from model_export.manifest import Manifest
from stage_service.protocol import HEADER_LENGTH, decode_response, encode_request
from tests.stage_service.procs import StageProcess, start_chain, stop_all
from tests.stage_service.wire import Wire

EXAMPLES = int(os.environ.get("MESHPIPE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
INFER = "/v2/models/tiny/infer"
RSS_LIMIT_MB = 600

# -------------------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def target(tiny_pipeline: tuple[Path, Manifest],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[StageProcess], httpx.Client]]:
    directory, _ = tiny_pipeline
    env = {"STAGE_MAX_REQUEST_BYTES": str(1 << 20), "STAGE_MAX_HEADER_BYTES": "16384",
           "STAGE_HEADER_TIMEOUT_S": "1", "STAGE_BODY_TIMEOUT_S": "1"}
    stages = start_chain(directory / "pipeline.json", env=env, log_dir=tmp_path_factory.mktemp("fuzz"))
    with httpx.Client(base_url=stages[0].url, timeout=30) as client:
        yield stages, client
    for stage in stages:
        assert stage.alive(), stage.log()
        assert rss_mb(stage.pid) < RSS_LIMIT_MB, f"{stage.name}: {rss_mb(stage.pid)} MB"
    assert stop_all(stages) == [0, 0, 0], "\n".join(s.log() for s in stages)


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def check(response: httpx.Response) -> None:
    """Below 500 (or a deliberate 503), errors as `{"error": ...}`."""
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str), response.text


# ---------------------------------------------------------------------------------------------------- tests


@FUZZ
@given(body=st.one_of(requests(binary=False).map(lambda r: r[0]), json_values))
def test_json_bodies(target: tuple[list[StageProcess], httpx.Client], body: Any) -> None:
    check(target[1].post(INFER, content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(request=requests(binary=True), junk=often(b"", st.binary(max_size=64)),
       declared=often(None, st.one_of(st.integers(-10, 10**7), header_values)))
def test_binary_framing(target: tuple[list[StageProcess], httpx.Client], request: tuple[dict[str, Any], bytes],
                        junk: bytes, declared: int | str | None) -> None:
    header, payload = request
    payload += junk
    head = json.dumps(header).encode()
    length = str(len(head)) if declared is None else str(declared)
    check(target[1].post(INFER, content=head + payload, headers={HEADER_LENGTH: length,
                                                                 "content-type": "application/octet-stream"}))


@FUZZ
@given(extra=st.dictionaries(header_names, header_values, max_size=30),
       path=st.sampled_from([INFER, "/v2/models/tiny-stage-0/infer", "/v2/models/tiny", "/v2/health/ready", "/v2",
                             "/metrics", "/v2/models/%00/infer", "/v2/models/tiny/versions/v1/infer"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
def test_headers_paths_and_methods(target: tuple[list[StageProcess], httpx.Client], extra: dict[str, str],
                                   path: str, method: str) -> None:
    body, length = encode_request({"x": np.ones((1, 16), np.float32)})
    headers = {HEADER_LENGTH: str(length), **extra}
    try:
        response = target[1].request(method, path, content=body if method in ("POST", "PUT") else None,
                                     headers=headers)
    except httpx.LocalProtocolError:
        return  # the client's own h11 refused to send it (e.g. Transfer-Encoding other than chunked): nothing sent
    assert response.status_code < 500 or response.status_code == 503, response.text


@settings(FUZZ, max_examples=max(EXAMPLES // 6, 10))
@given(data=raw_requests(INFER))
def test_raw_bytes(target: tuple[list[StageProcess], httpx.Client], data: bytes) -> None:
    """Whatever bytes arrive, the answer (if any: a malformed request may just be closed) is no 5xx but 503."""
    with Wire(target[0][0].url) as wire:
        wire.send(data)
        try:
            reply = wire.reply()
        except (ConnectionError, TimeoutError):
            return
        assert reply.status < 500 or reply.status == 503, reply


def test_still_right_after_the_fuzz(target: tuple[list[StageProcess], httpx.Client],
                                    reference: Callable[..., np.ndarray]) -> None:
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    body, length = encode_request({"x": x})
    r = target[1].post(INFER, content=body, headers={HEADER_LENGTH: str(length)})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(decode_response(r.content, r.headers[HEADER_LENGTH])[1]["y"], reference(x),
                               atol=1e-5, rtol=0)
    metrics = target[1].get("/metrics").text
    assert 'stage_requests_total{code="500"}' not in metrics
