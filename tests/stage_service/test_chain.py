"""A real 3-process chain on loopback: results, protocol, errors and metrics, end to end."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from model_export.manifest import Manifest
from stage_service.chain import PIPELINE_VERSION_HEADER as HEADER
from stage_service.protocol import decode_response, encode_request
from tests.stage_service.conftest import MAX_REQUEST_BYTES
from tests.stage_service.procs import StageProcess

RNG = np.random.default_rng(42)


def json_request(x: np.ndarray, name: str = "x", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def binary_body(header: dict[str, Any], *sections: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(sections), {"Inference-Header-Content-Length": str(len(head)),
                                       "content-type": "application/octet-stream"}


def post(stage: StageProcess, model: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{stage.url}/v2/models/{model}/infer", timeout=30, **kwargs)


# ------------------------------------------------------------------------------------------ results


def test_json_round_trip_equals_whole_model(chain: list[StageProcess], reference: Callable[..., np.ndarray]) -> None:
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    r = post(chain[0], "tiny", json=json_request(x))
    assert r.status_code == 200, r.text
    assert "Inference-Header-Content-Length" not in r.headers
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["y"]
    assert out[0]["shape"] == [3, 4] and out[0]["datatype"] == "FP32"
    y = np.asarray(out[0]["data"], dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(y, reference(x), atol=1e-5, rtol=0)


def test_binary_round_trip_equals_whole_model(chain: list[StageProcess], reference: Callable[..., np.ndarray]) -> None:
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    body, headers = binary_body(
        {"inputs": [{"name": "x", "shape": [5, 16], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        x.tobytes(),
    )
    r = post(chain[0], "tiny", content=body, headers=headers)
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 5 * 4 * 4
    y = np.frombuffer(r.content[length:], dtype="<f4").reshape(5, 4)
    np.testing.assert_allclose(y, reference(x), atol=1e-5, rtol=0)


def test_stage_name_runs_the_rest_of_the_chain(chain: list[StageProcess],
                                               reference: Callable[..., np.ndarray]) -> None:
    h1 = RNG.random((2, 32)).astype(np.float32)
    body, length = encode_request({"h1": h1})
    r = post(chain[1], "tiny-stage-1", content=body,
             headers={"Inference-Header-Content-Length": str(length)})
    assert r.status_code == 200, r.text
    response, outputs = decode_response(r.content, r.headers.get("Inference-Header-Content-Length"))
    assert response.model_name == "tiny-stage-1"
    np.testing.assert_allclose(outputs["y"], reference(h1, "stage-1.onnx", "stage-2.onnx"), atol=1e-5, rtol=0)


def test_tritonclient_unchanged(chain: list[StageProcess], reference: Callable[..., np.ndarray]) -> None:
    client = triton.InferenceServerClient(chain[0].url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
        x = RNG.standard_normal((4, 16)).astype(np.float32)
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = triton.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                out = triton.InferRequestedOutput("y", binary_data=binary_out)
                result = client.infer("tiny", [inp], outputs=[out], request_id="req-7")
                np.testing.assert_allclose(result.as_numpy("y"), reference(x), atol=1e-5, rtol=0)
                assert result.get_response()["id"] == "req-7"
        # No outputs named: tritonclient asks for all of them in binary.
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("tiny", [inp]).as_numpy("y"), reference(x), atol=1e-5, rtol=0)
    finally:
        client.close()


def test_timing_header_and_version(chain: list[StageProcess]) -> None:
    r = post(chain[0], "tiny", json=json_request(np.zeros((1, 16), np.float32)))
    assert r.status_code == 200
    assert r.json()["model_version"] == "v1"
    entries = r.headers["x-stage-timing"].split(",")
    assert [e.split("=")[0] for e in entries] == ["tiny-stage-0/v1", "tiny-stage-1/v1", "tiny-stage-2/v1"]
    assert all(re.fullmatch(r"\d+\.\d{3}", e.split("=")[1]) for e in entries)


def test_a_pinned_request_names_its_split_on_every_stage(chain: list[StageProcess],
                                                         tiny_pipeline: tuple[Path, Manifest]) -> None:
    """`x-pipeline-version` (the split the mesh pinned the request to) goes down the chain: every stage tags
    its timing with its own split; a request pinned to another split is refused, naming both."""
    split = tiny_pipeline[1].split_id
    r = post(chain[0], "tiny", json=json_request(np.zeros((1, 16), np.float32)), headers={HEADER: split})
    assert r.status_code == 200
    assert [e.split("=")[0] for e in r.headers["x-stage-timing"].split(",")] == [
        f"tiny-stage-{i}/v1@{split}" for i in range(3)]
    other = post(chain[0], "tiny", json=json_request(np.zeros((1, 16), np.float32)), headers={HEADER: "s9-00000000"})
    assert other.status_code == 400
    assert other.json()["error"] == (f"{HEADER} 's9-00000000' is not served here: stage tiny-stage-0 belongs to "
                                     f"split {split!r}")


def test_id_and_parameters_are_echoed(chain: list[StageProcess]) -> None:
    request = json_request(np.zeros((1, 16), np.float32), id="abc-1", parameters={"tenant": "t1",
                                                                                  "binary_data_output": False})
    body = post(chain[0], "tiny", json=request).json()
    assert body["id"] == "abc-1"
    assert body["parameters"] == {"tenant": "t1"}
    assert body["model_name"] == "tiny"


# ----------------------------------------------------------------------------------------- metadata


def test_metadata_pipeline_and_stage(chain: list[StageProcess]) -> None:
    pipeline = httpx.get(f"{chain[0].url}/v2/models/tiny").json()
    assert pipeline["inputs"][0]["name"] == "x" and pipeline["outputs"][0]["name"] == "y"
    assert pipeline["versions"] == ["v1"]
    middle = httpx.get(f"{chain[1].url}/v2/models/tiny-stage-1").json()
    assert middle["inputs"] == [{"name": "h1", "datatype": "FP32", "shape": [-1, 32]}]
    assert middle["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert middle["parameters"]["stage_outputs"] == [{"name": "h2", "datatype": "FP32", "shape": [-1, 24]}]
    assert httpx.get(f"{chain[1].url}/v2/models/tiny-stage-1/versions/v1/ready").status_code == 200


@pytest.mark.parametrize(("stage", "path"), [
    (0, "/v2/models/nope"),
    (1, "/v2/models/tiny"),  # the pipeline name is only served by the first stage
    (1, "/v2/models/tiny-stage-0"),
    (0, "/v2/models/tiny/versions/v9"),
    (0, "/v2/models/nope/ready"),
])
def test_unknown_model_is_404(chain: list[StageProcess], stage: int, path: str) -> None:
    r = httpx.get(chain[stage].url + path)
    assert r.status_code == 404
    assert "error" in r.json()
    # the first stage names only the pipeline: its stage names are the mesh's business (issue 14, row 10)
    assert ("'tiny'" in r.json()["error"] and "tiny-stage" not in r.json()["error"]) if stage == 0 else (
        "'tiny-stage-1'" in r.json()["error"])
    r = httpx.post(chain[stage].url + path + "/infer", json=json_request(np.zeros((1, 16), np.float32)))
    assert r.status_code == 404 and "error" in r.json()


# ------------------------------------------------------------------------------------------- errors

X = np.ones((1, 16), np.float32)
GOOD_INPUT = {"name": "x", "shape": [1, 16], "datatype": "FP32"}


def _bin(header: dict[str, Any], payload: bytes, declared: int | None = None) -> dict[str, Any]:
    body, headers = binary_body(header, payload)
    if declared is not None:
        headers["Inference-Header-Content-Length"] = str(declared)
    return {"content": body, "headers": headers}


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "not json": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "invalid"),
    "no inputs": ({"json": {"outputs": []}}, "inputs"),
    "wrong tensor name": ({"json": json_request(X, name="z")}, "z"),
    "wrong datatype": ({"json": {"inputs": [{**GOOD_INPUT, "datatype": "INT64", "data": [1] * 16}]}}, "INT64"),
    "unknown datatype": ({"json": {"inputs": [{**GOOD_INPUT, "datatype": "FLOAT", "data": [1] * 16}]}}, "FLOAT"),
    "wrong shape": ({"json": {"inputs": [{**GOOD_INPUT, "shape": [1, 15], "data": [1.0] * 15}]}}, "[-1, 16]"),
    "wrong rank": ({"json": {"inputs": [{**GOOD_INPUT, "shape": [16], "data": [1.0] * 16}]}}, "shape"),
    "data count": ({"json": {"inputs": [{**GOOD_INPUT, "data": [1.0] * 15}]}}, "15 elements"),
    "ragged data": ({"json": {"inputs": [{**GOOD_INPUT, "data": [[1.0], [1.0, 2.0]]}]}}, "rectangular"),
    "string data": ({"json": {"inputs": [{**GOOD_INPUT, "data": ["a"] * 16}]}}, "numbers"),
    "no data": ({"json": {"inputs": [GOOD_INPUT]}}, "neither"),
    "negative dim": ({"json": {"inputs": [{**GOOD_INPUT, "shape": [-1, 16], "data": [1.0] * 16}]}}, "negative"),
    "absurd shape": (_bin({"inputs": [{**GOOD_INPUT, "shape": [10**12, 16],
                                       "parameters": {"binary_data_size": 64 * 10**12}}]}, X.tobytes()), "absurd"),
    "binary shorter": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 64}}]}, X.tobytes()[:40]),
                       "shorter"),
    "binary longer": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 64}}]}, X.tobytes() + b"xx"),
                      "longer"),
    "binary size vs shape": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 40}}]},
                                  X.tobytes()[:40]), "needs 64"),
    "negative binary size": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": -64}}]}, X.tobytes()),
                             "non-negative"),
    "header length not a number": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 64}}]},
                                        X.tobytes(), declared=None) | {"headers": {
                                            "Inference-Header-Content-Length": "ten"}}, "Inference-Header"),
    "header length past body": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 64}}]},
                                     X.tobytes(), declared=10**6), "Inference-Header"),
    "header length negative": (_bin({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 64}}]},
                                    X.tobytes(), declared=-5), "Inference-Header"),
    "unknown output": ({"json": json_request(X, outputs=[{"name": "h1"}])}, "h1"),
    "duplicate input": ({"json": {"inputs": [{**GOOD_INPUT, "data": [1.0] * 16}] * 2}}, "twice"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_400_naming_the_problem(chain: list[StageProcess], case: str) -> None:
    kwargs, expected = BAD_REQUESTS[case]
    r = post(chain[0], "tiny", **kwargs)
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert expected.lower() in message.lower() or (expected == "absurd" and "elements" in message), message


def test_tritonclient_compressed_requests(chain: list[StageProcess], reference: Callable[..., np.ndarray]) -> None:
    """tritonclient's request_compression_algorithm (gzip, deflate) as Triton takes it: the body decoded first."""
    client = triton.InferenceServerClient(chain[0].url.removeprefix("http://"))
    try:
        x = RNG.standard_normal((2, 16)).astype(np.float32)
        for algorithm in ("gzip", "deflate"):
            for binary_in in (True, False):
                inp = triton.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                result = client.infer("tiny", [inp], request_compression_algorithm=algorithm,
                                      response_compression_algorithm=algorithm)
                np.testing.assert_allclose(result.as_numpy("y"), reference(x), atol=1e-5, rtol=0)
    finally:
        client.close()


def test_a_compressed_body_is_checked_as_it_is_decoded(chain: list[StageProcess]) -> None:
    body = json.dumps(json_request(np.ones((1, 16), np.float32))).encode()
    packed = gzip.compress(body)
    bomb = gzip.compress(b" " * (MAX_REQUEST_BYTES + 1))  # JSON whitespace, a thousandth of its size packed
    for sent, encoding, status, words in (
        (zlib.compress(body), "deflate", 200, None), (packed, "GZIP", 200, None), (body, "identity", 200, None),
        (packed, "br", 415, "Content-Encoding 'br' is not decoded here"),
        (packed[:-12], "gzip", 400, "the gzip body is cut short"),
        (packed + b"x", "gzip", 400, "followed by other data"),
        (body, "gzip", 400, "is not gzip data as its Content-Encoding says"),
        (bomb, "gzip", 413, "decodes to over the limit"),
    ):
        r = post(chain[0], "tiny", content=sent, headers={"content-encoding": encoding})
        assert r.status_code == status, (encoding, r.text)
        assert words is None or words in r.json()["error"], r.text


def test_body_over_limit_is_413(chain: list[StageProcess]) -> None:
    big = np.zeros((MAX_REQUEST_BYTES // 64 + 1, 16), np.float32)
    body, length = encode_request({"x": big})
    r = post(chain[0], "tiny", content=body, headers={"Inference-Header-Content-Length": str(length)})
    assert r.status_code == 413
    assert "STAGE_MAX_REQUEST_BYTES" in r.json()["error"]

    def chunks() -> Any:  # no Content-Length: the limit is enforced while streaming
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = post(chain[0], "tiny", content=chunks(), headers={"Inference-Header-Content-Length": str(length)})
    assert r.status_code == 413


def test_chain_survives_bad_input_and_counts_it(chain: list[StageProcess],
                                                reference: Callable[..., np.ndarray]) -> None:
    assert post(chain[0], "tiny", content=b"\xff\xfe garbage").status_code == 400
    assert all(s.alive() for s in chain)
    x = RNG.standard_normal((1, 16)).astype(np.float32)
    r = post(chain[0], "tiny", json=json_request(x))
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 4), reference(x),
                               atol=1e-5, rtol=0)
    text = httpx.get(f"{chain[0].url}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['stage_requests_total{code="200"}'] >= 1
    assert samples['stage_requests_total{code="400"}'] >= 1
    assert samples["stage_request_duration_seconds_count"] >= 2
    assert samples["stage_inference_duration_seconds_count"] >= 1
    assert samples["stage_downstream_duration_seconds_count"] >= 1
    assert samples["stage_request_bytes_total"] > 0 and samples["stage_response_bytes_total"] > 0
    assert samples["stage_inflight_requests"] == 0
    assert samples['stage_info{pipeline="tiny",stage="tiny-stage-0",version="v1"}'] == 1
    last = httpx.get(f"{chain[2].url}/metrics").text
    assert "stage_downstream_duration_seconds_count 0.0" in last  # the last stage forwards nowhere
