"""Every datatype the stage must carry (FP32, FP16, INT64, INT32, UINT8, BOOL), through the codec and a
real process serving a one-stage pipeline of identities, in JSON and binary."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from model_export.manifest import NUMPY_TO_DATATYPE
from model_export.pipeline_writer import write_pipeline
from stage_service.errors import InvalidInput
from stage_service.protocol import decode_request, decode_response, encode_json_request, encode_request
from tests.stage_service.procs import StageProcess, start_stage
from tests.tiny import IR_VERSION, OPSET

RNG = np.random.default_rng(7)
ARRAYS = {
    "f32": RNG.standard_normal((2, 3)).astype(np.float32),
    "f16": RNG.standard_normal((2, 3)).astype(np.float16),
    "i64": RNG.integers(-(2**40), 2**40, (2, 3)).astype(np.int64),
    "i32": RNG.integers(-(2**30), 2**30, (2, 3)).astype(np.int32),
    "u8": RNG.integers(0, 256, (2, 3)).astype(np.uint8),
    "b": RNG.random((2, 3)) > 0.5,
}
ONNX_TYPES = {"FP32": TensorProto.FLOAT, "FP16": TensorProto.FLOAT16, "INT64": TensorProto.INT64,
              "INT32": TensorProto.INT32, "UINT8": TensorProto.UINT8, "BOOL": TensorProto.BOOL}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_binary_codec_round_trip(name: str) -> None:
    body, length = encode_request({name: ARRAYS[name]}, request_id="r")
    request, tensors = decode_request(body, str(length))
    assert request.id == "r" and request.inputs[0].datatype == NUMPY_TO_DATATYPE[ARRAYS[name].dtype.name]
    np.testing.assert_array_equal(tensors[name], ARRAYS[name])
    assert tensors[name].dtype == ARRAYS[name].dtype


@pytest.mark.parametrize("name", list(ARRAYS))
def test_json_codec_round_trip(name: str) -> None:
    _, tensors = decode_request(encode_json_request({name: ARRAYS[name]}), None)
    np.testing.assert_array_equal(tensors[name], ARRAYS[name])
    assert tensors[name].dtype == ARRAYS[name].dtype


@pytest.mark.parametrize(("datatype", "data", "words"), [
    ("UINT8", [300], "out of range"),
    ("INT32", [1.5], "integers"),
    ("BOOL", [1], "true/false"),
    ("FP32", [True], "numbers"),
])
def test_json_values_must_fit_the_datatype(datatype: str, data: list[object], words: str) -> None:
    body = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": datatype, "data": data}]})
    with pytest.raises(InvalidInput, match=words):
        decode_request(body.encode(), None)


@pytest.fixture(scope="module")
def identity_stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageProcess]:
    """A one-stage pipeline `types` whose outputs `<name>_out` are its inputs, for every datatype."""
    directory = tmp_path_factory.mktemp("types")
    types = {n: ONNX_TYPES[NUMPY_TO_DATATYPE[a.dtype.name]] for n, a in ARRAYS.items()}
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ARRAYS],
        "types",
        [helper.make_tensor_value_info(n, t, ["batch", 3]) for n, t in types.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, ["batch", 3]) for n, t in types.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.save(model, directory / "model.onnx")
    write_pipeline(directory, "types", [model], directory / "model.onnx")
    process = start_stage(directory / "pipeline.json", "types-stage-0", log_dir=directory)
    yield process
    assert process.stop() == 0


def test_every_datatype_served_binary_and_json(identity_stage: StageProcess) -> None:
    url = f"{identity_stage.url}/v2/models/types/infer"
    body, length = encode_request(ARRAYS)
    r = httpx.post(url, content=body, headers={"Inference-Header-Content-Length": str(length)})
    assert r.status_code == 200, r.text
    _, binary = decode_response(r.content, r.headers["Inference-Header-Content-Length"])
    r = httpx.post(url, content=encode_json_request(ARRAYS), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    _, from_json = decode_response(r.content, None)
    for name, array in ARRAYS.items():
        for got in (binary[f"{name}_out"], from_json[f"{name}_out"]):
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array)


def test_binary_sections_apart_from_the_header_decode_as_a_joined_body_would() -> None:
    """gRPC hands the data plane its raw tensors apart from the JSON header (`InferCall.sections`)."""
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2]], np.int64)
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}}]}).encode()
    joined = decode_request(head + a.tobytes() + b.tobytes(), str(len(head)))[1]
    apart = decode_request(head, str(len(head)), sections=[a.tobytes(), b.tobytes()])[1]
    assert all(np.array_equal(joined[n], apart[n]) for n in ("a", "b"))
    with pytest.raises(InvalidInput, match="1 binary sections for 2 tensors"):
        decode_request(head, str(len(head)), sections=[a.tobytes()])
    with pytest.raises(InvalidInput, match="tensor b: the binary body is shorter than its header says: 16 bytes"):
        decode_request(head, str(len(head)), sections=[a.tobytes(), b.tobytes()[:8]])
