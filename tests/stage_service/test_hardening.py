"""Issue 14's hostile inputs against a real 3-process chain: every row of its table answered 4xx naming what
was wrong, never 500; slow and oversized clients refused without starving the stage; keep-alive intact.

The chain runs with small limits so each can be reached cheaply: 1 s header and body timeouts, 2 requests
in flight, 8 KiB of headers, 4096 JSON values, 64 KiB bodies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_export.manifest import Manifest
from stage_service.protocol import HEADER_LENGTH, decode_response, encode_request
from tests.stage_service.procs import StageProcess, start_chain, start_stage, stop_all
from tests.stage_service.wire import Wire

LIMITS = {
    "STAGE_MAX_REQUEST_BYTES": "65536",
    "STAGE_HEADER_TIMEOUT_S": "1",
    "STAGE_BODY_TIMEOUT_S": "1",
    "STAGE_MAX_INFLIGHT": "2",
    "STAGE_MAX_HEADER_BYTES": "8192",
    "STAGE_MAX_JSON_VALUES": "4096",
}
INFER = "/v2/models/tiny/infer"
X = np.ones((1, 16), np.float32)


@pytest.fixture(scope="module")
def hard(tiny_pipeline: tuple[Path, Manifest],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[StageProcess]]:
    directory, _ = tiny_pipeline
    work = tmp_path_factory.mktemp("hardening")
    env = {**LIMITS, "STAGE_TRACE_FILE": str(work / "traces" / "{stage}.jsonl")}
    stages = start_chain(directory / "pipeline.json", env=env, log_dir=work)
    yield stages
    assert stop_all(stages) == [0, 0, 0], "\n".join(s.log() for s in stages)


def post(stage: StageProcess, **kwargs: Any) -> httpx.Response:
    return httpx.post(stage.url + INFER, timeout=30, **kwargs)


def binary(header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
    head = json.dumps(header).encode()
    return {"content": head + payload, "headers": {HEADER_LENGTH: str(len(head))}}


def one_input(shape: list[int], **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", **fields}]}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def metric(stage: StageProcess, name: str) -> float:
    for line in httpx.get(f"{stage.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


def good_request(stage: StageProcess) -> httpx.Response:
    body, length = encode_request({"x": X})
    return post(stage, content=body, headers={HEADER_LENGTH: str(length)})


# Row 1 (shapes), row 2 (parameters nesting), row 11 (binary_data strings, FP32 overflow): 400, never 500.
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "batch 0, JSON": ({"json": one_input([0, 16], data=[])}, "dimension of 0"),
    "batch 0, binary": (binary(one_input([0, 16], parameters={"binary_data_size": 0})), "dimension of 0"),
    "zero-size image": ({"json": one_input([0, 64, 64, 3], data=[])}, "dimension of 0"),
    "65 dimensions, JSON": ({"json": one_input([1] * 65, data=[1.0])}, "at most 64"),
    "65 dimensions, binary": (binary(one_input([1] * 65, parameters={"binary_data_size": 4}), b"\0" * 4),
                              "at most 64"),
    "[0, 2**62, 2**62]": ({"json": one_input([0, 2**62, 2**62], data=[])}, "dimension of 0"),
    "[1, 2**62, 2**62]": (binary(one_input([1, 2**62, 2**62], parameters={"binary_data_size": 4}), b"\0" * 4),
                          "elements"),
    "parameters 300 deep": ({"json": {**one_input([1, 16], data=[1.0] * 16), "parameters": nested(300)}},
                            "parameters nest 300 levels"),
    "input parameters 300 deep": ({"json": one_input([1, 16], data=[1.0] * 16, parameters=nested(300))},
                                  "input x: parameters nest"),
    "parameters 2000 deep": ({"content": b'{"parameters":' + b'{"a":' * 2000 + b"1" + b"}" * 2001 +
                              b', "inputs": []}'}, "not valid JSON"),
    "binary_data 'false'": ({"json": {**one_input([1, 16], data=[1.0] * 16),
                                      "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}},
                            "binary_data must be true or false"),
    "binary_data_output 'yes'": ({"json": {**one_input([1, 16], data=[1.0] * 16),
                                           "parameters": {"binary_data_output": "yes"}}},
                                 "binary_data_output must be true or false"),
    "FP32 1e39": ({"json": one_input([1, 16], data=[1e39] + [1.0] * 15)}, "out of range for FP32"),
    # in the client's terms: the model it asked for (the pipeline), not the first stage's own name
    "a wrong tensor name": ({"json": {"inputs": [{"name": "img", "shape": [1, 16], "datatype": "FP32",
                                                  "data": [1.0] * 16}]}},
                            "tensor img: not an input of tiny; expected ['x']"),
    "shape of strings": ({"json": one_input(["1", 16], data=[1.0] * 16)}, "Input should be a valid integer"),
    "data of strings": ({"json": one_input([1, 16], data=["NaN"] * 16)}, "data must hold numbers for datatype "
                        "FP32, got strings"),
    # the binary framing: a header length that cuts the JSON short, and tensors after the JSON without one
    "header length short": ({"content": binary(one_input([1, 16], parameters={"binary_data_size": 64}),
                                               X.tobytes())["content"], "headers": {HEADER_LENGTH: "10"}},
                            f"the first 10 bytes of the body ({HEADER_LENGTH}) are not valid JSON"),
    "binary without header length": ({"content": binary(one_input([1, 16], parameters={"binary_data_size": 64}),
                                                        X.tobytes())["content"]},
                                     f"followed by binary tensors needs {HEADER_LENGTH}"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_400_naming_it(hard: list[StageProcess], case: str) -> None:
    kwargs, words = BAD[case]
    r = post(hard[0], **kwargs)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_a_path_no_route_takes_is_404_naming_the_routes_never_a_redirect(hard: list[StageProcess]) -> None:
    """A trailing slash was redirected (307) to an http:// Location, plaintext to a TLS gateway's port."""
    for method, path in (("POST", INFER + "/"), ("GET", "/v2/models/tiny/"), ("GET", "/v2/models/tiny/x/y")):
        r = httpx.request(method, hard[0].url + path, timeout=10)
        assert r.status_code == 404 and "location" not in r.headers, r
        assert r.json()["error"].startswith(f"no route for {method} {path}; a stage serves GET /v2,"), r.text
        served = r.json()["error"].split("; a stage serves ")[1].split(", ")
        assert {"GET /v2/health/ready", "GET /metrics", "GET /v2/models/{name}[/versions/{model_version}]",
                "POST /v2/models/{name}[/versions/{model_version}]/infer"} <= set(served), served
    r = httpx.delete(hard[0].url + "/v2/health/ready", timeout=10)
    assert r.status_code == 405 and sorted(r.headers["allow"].split(", ")) == ["GET", "HEAD"]
    assert r.json() == {"error": f"DELETE /v2/health/ready: method not allowed; this path takes {r.headers['allow']}"}


def test_head_is_answered_wherever_get_is(hard: list[StageProcess]) -> None:
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/tiny", "/v2/models/tiny/ready", "/metrics"):
        got, head = httpx.get(hard[0].url + path, timeout=10), httpx.head(hard[0].url + path, timeout=10)
        assert got.status_code == head.status_code == 200 and head.content == b"", (path, head)
        assert head.headers["content-type"] == got.headers["content-type"]


def test_an_error_keeps_the_connection_alive(hard: list[StageProcess]) -> None:
    """Row 3: the answer to a bad request leaves the connection usable (before: a 500, then a reset)."""
    bad = json.dumps(one_input([0, 16], data=[])).encode()
    body, length = encode_request({"x": X})
    with Wire(hard[0].url) as wire:
        for _ in range(3):
            r = wire.request("POST", INFER, bad, {"content-type": "application/json"})
            assert r.status == 400 and not r.closes, r
            r = wire.request("POST", INFER, body, {HEADER_LENGTH: str(length)})
            assert r.status == 200, r


def test_nan_outputs_are_refused_in_json_and_sent_in_binary(hard: list[StageProcess]) -> None:
    """Row 11: JSON cannot carry NaN (it was written as null with 200); binary can."""
    x = np.full((1, 16), np.nan, np.float32)
    body, length = encode_request({"x": x})
    header = json.loads(body[:length])
    header["parameters"] = {"binary_data_output": False}
    head = json.dumps(header).encode()
    r = post(hard[0], content=head + body[length:], headers={HEADER_LENGTH: str(len(head))})
    assert r.status_code == 400, r.text
    assert "output y: 4 of 4 values are NaN or infinite" in r.json()["error"]
    r = post(hard[0], content=body, headers={HEADER_LENGTH: str(length)})
    assert r.status_code == 200, r.text
    assert np.isnan(decode_response(r.content, r.headers[HEADER_LENGTH])[1]["y"]).all()


def test_a_huge_id_does_not_bloat_the_span_file(hard: list[StageProcess], tmp_path_factory: pytest.TempPathFactory,
                                                 ) -> None:
    """Row 11: span attributes and messages are cut (a 1 MB id made 3 MB of spans)."""
    traces = next(Path(s.log_path).parent for s in hard) / "traces"
    file = traces / "tiny-stage-0.jsonl"
    before = file.stat().st_size if file.exists() else 0
    r = post(hard[0], json={**one_input([1, 16], data=[1.0] * 16), "id": "i" * 60_000})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not file.exists() or file.stat().st_size == before):
        time.sleep(0.1)
    time.sleep(0.5)  # the batch of spans is written at once
    # Only this request's spans count: spans of earlier requests may be flushed into the file meanwhile.
    with file.open("rb") as spans:
        spans.seek(before)
        ours = [line for line in spans.read().splitlines() if b"i" * 100 in line]
    assert ours, "no span of the request was written"
    assert sum(len(line) for line in ours) < 20_000


# Row 4: slow clients.


def test_slow_bodies_hold_no_inflight_slot_and_get_408(hard: list[StageProcess]) -> None:
    """4 clients trickling bodies into a stage with 2 slots: good requests still get 200; the slow ones get
    408 with Connection: close once STAGE_BODY_TIMEOUT_S has passed."""
    slow = [Wire(hard[0].url) for _ in range(4)]
    try:
        for wire in slow:
            wire.send(wire.head("POST", INFER, {"content-length": "1000"}) + b'{"inputs": [')
        time.sleep(0.2)
        assert [good_request(hard[0]).status_code for _ in range(5)] == [200] * 5
        for wire in slow:
            reply = wire.reply()
            assert reply.status == 408 and reply.closes, reply
            assert "STAGE_BODY_TIMEOUT_S" in reply.json()["error"]
            assert wire.closed_within(2)
    finally:
        for wire in slow:
            wire.sock.close()
    assert good_request(hard[0]).status_code == 200


def test_bodies_held_at_once_are_bounded(hard: list[StageProcess]) -> None:
    """4 uploads of 60 KB each stall before their end: 240 KB of the 256 KiB budget (4 x 64 KiB). A fifth
    large one is refused (503) at once; small requests still pass; once the stalled ones time out (408), the
    budget is back and a large request passes too."""
    def stalled(size: int) -> Wire:
        wire = Wire(hard[1].url)
        wire.send(wire.head("POST", "/v2/models/tiny-stage-1/infer", {"content-length": str(size + 100)})
                  + b"\0" * size)
        return wire

    held = [stalled(60_000) for _ in range(4)]
    try:
        time.sleep(0.3)
        with stalled(60_000) as fifth:
            reply = fifth.reply()
            assert reply.status == 503 and "STAGE_MAX_BUFFERED_BYTES" in reply.json()["error"], reply
        h1 = np.ones((1, 32), np.float32)
        body, length = encode_request({"h1": h1})
        small = httpx.post(f"{hard[1].url}/v2/models/tiny-stage-1/infer", content=body, timeout=30,
                           headers={HEADER_LENGTH: str(length)})
        assert small.status_code == 200, small.text
        assert [wire.reply().status for wire in held] == [408] * 4
    finally:
        for wire in held:
            wire.sock.close()
    body, length = encode_request({"h1": np.ones((450, 32), np.float32)})  # 57.6 KB
    big = httpx.post(f"{hard[1].url}/v2/models/tiny-stage-1/infer", content=body, timeout=30,
                     headers={HEADER_LENGTH: str(length)})
    assert big.status_code == 200, big.text


def test_stuck_headers_are_answered_408_and_closed(hard: list[StageProcess]) -> None:
    stuck = [Wire(hard[0].url) for _ in range(10)]
    idle = Wire(hard[0].url)
    try:
        for wire in stuck:
            wire.send(b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\ncontent-le")
        assert good_request(hard[0]).status_code == 200
        for wire in stuck:
            reply = wire.reply()
            assert reply.status == 408 and reply.closes and "STAGE_HEADER_TIMEOUT_S" in reply.json()["error"]
            assert wire.closed_within(2)
        assert idle.closed_within(3) and idle.buffer == b""  # never sent a byte: closed without an answer
    finally:
        for wire in [*stuck, idle]:
            wire.sock.close()


# Row 5: sizes.


@pytest.mark.parametrize("sent", ["whole", "trickled", "unfinished at once"])
def test_headers_over_the_limit_are_431(hard: list[StageProcess], sent: str) -> None:
    with Wire(hard[0].url) as wire:
        head = wire.head("GET", "/v2/health/live", {"x-big": "b" * 20_000})
        if sent == "unfinished at once":  # one read: the request line and a header line that never ends
            wire.send(head[:-4])
        elif sent == "trickled":
            head = head[:-4]  # the headers never end: refused once 8 KiB have arrived
            sent = 0
            while sent < len(head) and not wire.buffer:
                wire.send(head[sent:sent + 1000])
                sent += 1000
                time.sleep(0.01)
                wire.closed_within(0.01)  # reads what has come back
            assert sent < 12_000
        else:
            wire.send(head)
        reply = wire.reply()
        assert reply.status == 431 and reply.closes, reply
        assert "STAGE_MAX_HEADER_BYTES" in reply.json()["error"]
    with Wire(hard[0].url) as wire:  # just under the limit is fine
        assert wire.request("GET", "/v2/health/live", headers={"x-big": "b" * 7000}).status == 200


def test_json_with_more_values_than_the_limit_is_413(hard: list[StageProcess]) -> None:
    """A valid JSON request of 4992 values, over STAGE_MAX_JSON_VALUES=4096: refused before parsing."""
    r = post(hard[0], json=one_input([312, 16], data=[0] * 312 * 16))
    assert r.status_code == 413, r.text
    assert "STAGE_MAX_JSON_VALUES" in r.json()["error"]
    assert post(hard[0], json=one_input([200, 16], data=[0] * 200 * 16)).status_code == 200


def test_a_batch_too_large_for_a_later_stage_is_413_at_the_first(hard: list[StageProcess]) -> None:
    """600 samples: 38 KB into stage 0, but 77 KB into tiny-stage-1 (32 floats a sample), over 64 KiB. Refused at
    stage 0 before any work (before: stage 1's 413 came back as 502)."""
    runs = [metric(s, "stage_inference_duration_seconds_count") for s in hard]
    body, length = encode_request({"x": np.ones((600, 16), np.float32)})
    r = post(hard[0], content=body, headers={HEADER_LENGTH: str(length)})
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert "tiny-stage-1" in message and "at most 480 samples" in message, message
    assert [metric(s, "stage_inference_duration_seconds_count") for s in hard] == runs
    body, length = encode_request({"x": np.ones((480, 16), np.float32)})
    assert post(hard[0], content=body, headers={HEADER_LENGTH: str(length)}).status_code == 200


def test_a_later_stage_413_comes_back_as_413(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path,
                                             reference: Callable[..., np.ndarray]) -> None:
    """Stage 0 allows 1 MiB bodies, stage 1 only 64 KiB: stage 1's refusal is the client's (413), not a 502."""
    manifest = tiny_pipeline[0] / "pipeline.json"
    started: list[StageProcess] = []
    try:
        started.append(start_stage(manifest, "tiny-stage-2", log_dir=tmp_path))
        started.append(start_stage(manifest, "tiny-stage-1", next_url=started[-1].url, log_dir=tmp_path,
                                   env={"STAGE_MAX_REQUEST_BYTES": "65536"}))
        started.append(start_stage(manifest, "tiny-stage-0", next_url=started[-1].url, log_dir=tmp_path))
        body, length = encode_request({"x": np.ones((600, 16), np.float32)})
        r = post(started[-1], content=body, headers={HEADER_LENGTH: str(length)})
        assert r.status_code == 413, r.text
        assert "tiny-stage-1" in r.json()["error"] and "STAGE_MAX_REQUEST_BYTES" in r.json()["error"]
    finally:
        assert stop_all(started[::-1]) == [0, 0, 0]


def test_json_amplification_is_bounded(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """Row 5: a 20 MB JSON body of empty lists (each ~60 bytes once parsed) is refused before parsing; the
    stage's peak RSS stays far below what parsing it takes (before: ~700 MB)."""
    stage = start_stage(tiny_pipeline[0] / "pipeline.json", "tiny-stage-2", log_dir=tmp_path)
    try:
        base = peak_rss_mb(stage.pid)
        count = 20_000_000 // 3
        body = b'{"inputs":[{"name":"h2","shape":[1,24],"datatype":"FP32","data":[' + b"[]," * count + b"[]]}]}"
        r = httpx.post(f"{stage.url}/v2/models/tiny-stage-2/infer", content=body, timeout=60)
        assert r.status_code == 413, r.text
        assert "STAGE_MAX_JSON_VALUES" in r.json()["error"]
        grown = peak_rss_mb(stage.pid) - base
        assert grown < 250, f"peak RSS grew {grown} MB"
        assert stage.alive()
    finally:
        assert stage.stop() == 0


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def test_many_slow_clients_at_once_leave_the_stage_answering(hard: list[StageProcess]) -> None:
    """Twice STAGE_MAX_INFLIGHT clients trickling bodies while others send good requests concurrently."""
    slow = [Wire(hard[1].url) for _ in range(8)]
    try:
        for wire in slow:
            wire.send(wire.head("POST", "/v2/models/tiny-stage-1/infer", {"content-length": "4000"}) + b"{")
        h1 = np.ones((1, 32), np.float32)
        body, length = encode_request({"h1": h1})

        def one(_: int) -> int:
            return httpx.post(f"{hard[1].url}/v2/models/tiny-stage-1/infer", content=body, timeout=30,
                              headers={HEADER_LENGTH: str(length)}).status_code

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(one, range(10))) == [200] * 10
    finally:
        for wire in slow:
            wire.sock.close()
