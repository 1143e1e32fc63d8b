"""Large JSON requests take simdjson's path (`protocol._numeric_inputs`: each input's flat numeric `data`
parsed straight into an array); everything else orjson's. Both must give the same request, the same arrays
and the same refusal, byte for byte: here every case is decoded both ways (the size threshold moved to 0 and
out of reach) and compared."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from stage_service import protocol
from stage_service.errors import InvalidInput, PayloadTooLarge, StageError

RNG = np.random.default_rng(11)


def tensor(name: str, datatype: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data, **extra}


CASES: dict[str, dict[str, Any]] = {
    "fp32 flat": {"inputs": [tensor("x", "FP32", [2, 3], RNG.standard_normal(6).tolist())]},
    "fp16 and int64 and uint8": {"id": "r1", "parameters": {"a": {"b": [1, 2]}}, "inputs": [
        tensor("h", "FP16", [4], [0.5, -1.0, 2.0, 65504.0]),
        tensor("i", "INT64", [3], [-(2**62), 0, 2**62]),
        tensor("u", "UINT8", [1, 3], [0, 7, 255], parameters={"k": "v"})],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}]},
    "nested rows": {"inputs": [tensor("x", "FP32", [2, 2], [[1.0, 2.0], [3.0, 4.0]])]},
    "ragged rows": {"inputs": [tensor("x", "FP32", [3], [[1.0, 2.0], [3.0]])]},
    "bools": {"inputs": [tensor("b", "BOOL", [3], [True, False, True])]},
    "a string among numbers": {"inputs": [tensor("x", "FP32", [2], [1.0, "two"])]},
    "floats for an integer tensor": {"inputs": [tensor("i", "INT32", [2], [1.5, 2.0])]},
    "out of range for uint8": {"inputs": [tensor("u", "UINT8", [2], [1, 300])]},
    "out of range for fp32": {"inputs": [tensor("x", "FP32", [1], [1e39])]},
    "too large for int64": {"inputs": [tensor("i", "INT64", [1], [2**64 - 1])]},
    "too few values": {"inputs": [tensor("x", "FP32", [2, 3], [1.0, 2.0])]},
    "unknown datatype": {"inputs": [tensor("x", "FP128", [1], [1.0])]},
    "data not a list": {"inputs": [tensor("x", "FP32", [1], 1.0)]},
    "input not an object": {"inputs": [[1, 2]]},
    "no inputs": {"inputs": []},
    "twice the same name": {"inputs": [tensor("x", "FP32", [1], [1.0]), tensor("x", "FP32", [1], [2.0])]},
    "binary flag not a bool": {"inputs": [tensor("x", "FP32", [1], [1.0], parameters={"binary_data": 1})]},
}
TEXTS = {**{k: json.dumps(v).encode() for k, v in CASES.items()},
         "not JSON": b'{"inputs": [',
         "NaN": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
         "not an object": b"[1, 2, 3]"}


def decode(body: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    monkeypatch.setattr(protocol, "FAST_JSON_MIN_BYTES", 0 if fast else 1 << 62)
    try:
        request, arrays = protocol.decode_request(body, None)
    except StageError as exc:
        return "refused", (type(exc).__name__, exc.message)
    return "decoded", (request.model_dump(exclude={"inputs": {"__all__": {"data"}}}),
                       {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()})


@pytest.mark.parametrize("case", list(TEXTS))
def test_simdjson_and_orjson_paths_agree(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert decode(TEXTS[case], True, monkeypatch) == decode(TEXTS[case], False, monkeypatch)


def test_a_large_request_takes_the_fast_path_and_keeps_every_value() -> None:
    x = RNG.standard_normal((1, 64, 56, 56)).astype(np.float32)
    body, _ = protocol.request_body({"x": x}, binary=False)
    assert len(body) >= protocol.FAST_JSON_MIN_BYTES
    document, parsed = protocol._loads_request(body)
    assert document["inputs"][0]["data"] == [] and parsed[0].dtype == np.float64
    request, arrays = protocol.decode_request(body, None)
    np.testing.assert_array_equal(arrays["x"], x)
    assert arrays["x"].dtype == np.float32 and request.inputs[0].name == "x"


def test_a_large_bad_value_is_refused_as_the_small_path_refuses_it() -> None:
    data = [0.0] * 20_000 + [1e39]
    body = json.dumps({"inputs": [tensor("x", "FP32", [len(data)], data)]}).encode()
    assert len(body) >= protocol.FAST_JSON_MIN_BYTES
    with pytest.raises(InvalidInput, match="magnitude 1e\\+39 is out of range for FP32"):
        protocol.decode_request(body, None)


def test_the_kept_parser_gives_way_while_a_value_of_its_last_document_lives() -> None:
    """simdjson refuses to reuse a parser whose last document still has a live value (a traceback can hold
    one): the next request then gets a fresh parser, not an error."""
    held = protocol._parse(b'{"inputs": [1, 2]}')["inputs"]
    x = RNG.standard_normal((2, 20_000)).astype(np.float32)
    body, _ = protocol.request_body({"x": x}, binary=False)
    for _ in range(2):  # the second request reuses the fresh parser
        np.testing.assert_array_equal(protocol.decode_request(body, None)[1]["x"], x)
    assert list(held) == [1, 2]


def test_the_json_value_count_refuses_over_the_limit_and_counts_exactly() -> None:
    body = b'{"inputs": [{"data": [1, 2, [3, 4]], "o": {}}]}'
    limit = body.count(b",") + body.count(b"[") + body.count(b"{")
    protocol._count_json_values(body, limit)
    with pytest.raises(PayloadTooLarge, match=f"about {limit} values, over the limit of {limit - 1}"):
        protocol._count_json_values(body, limit - 1)


@pytest.mark.parametrize("fast", [True, False])
def test_refusals_name_what_json_cannot_be(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "FAST_JSON_MIN_BYTES", 0 if fast else 1 << 40)
    strings = json.dumps({"inputs": [tensor("x", "FP32", ["1", 2], [1.0, 2.0])]}).encode()
    with pytest.raises(InvalidInput, match=r"^invalid inference request: inputs\.0\.shape\.0: Input should be a "
                                           r"valid integer \(got '1'\)$"):
        protocol.decode_request(strings, None)
    for number in (b"NaN", b"-Infinity"):
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, ' + number + b"]}]}"
        with pytest.raises(InvalidInput, match="not valid JSON .*; JSON has no NaN or Infinity: send such values in "
                                               "binary"):
            protocol.decode_request(body, None)
    with pytest.raises(InvalidInput, match=r"the document: Input should be a valid dictionary \(got an array\)$"):
        protocol.decode_request(b"[]", None)
