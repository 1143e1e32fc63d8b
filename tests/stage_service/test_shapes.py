"""Serving every shape of model (issue 13, item 4): two inputs (INT64 token ids of any length, FP32 features),
three outputs (FP32, FP32, INT32), and a cut whose tensors have a dynamic sequence dimension besides the batch;
through two real stage processes, with tritonclient, JSON and binary, batch 1 and 4, lengths 3 and 7.

Batch 0 is refused (400, naming the tensor) rather than answered empty: there is nothing to infer, and an
empty answer would hide a client's bug. Inputs whose batch sizes disagree are 400 naming both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from model_export.manifest import (
    Manifest,
    Profile,
    SourceModel,
    Stage,
    StageCost,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from tests.stage_service.procs import StageProcess, start_chain, stop_all
from tests.tiny import IR_VERSION, OPSET

F, I32, I64 = int(TensorProto.FLOAT), int(TensorProto.INT32), int(TensorProto.INT64)
Tensor = tuple[str, int, list[Any]]  # (name, onnx type, symbolic shape)
SEQ: list[Any] = ["batch", "seq"]
IDS: Tensor = ("ids", I64, SEQ)
X: Tensor = ("x", F, ["batch", 3])
CUT: list[Tensor] = [("e", F, SEQ), ("x2", F, ["batch", 3]), ("ids32", I32, SEQ)]
OUT: list[Tensor] = [("s", F, ["batch", 1]), ("t", F, ["batch", 3]), ("tokens", I32, SEQ)]
DATATYPE = {F: "FP32", I32: "INT32", I64: "INT64"}


def spec(tensor: Tensor) -> TensorSpec:
    name, kind, dims = tensor
    return TensorSpec.model_validate({"name": name, "datatype": DATATYPE[kind],
                                      "shape": [d if isinstance(d, int) else -1 for d in dims]})


def model(name: str, inputs: list[Tensor], outputs: list[Tensor], nodes: list[onnx.NodeProto],
          inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(*t) for t in inputs],
                              [helper.make_tensor_value_info(*t) for t in outputs], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(m)
    return m


STAGE_0 = ([helper.make_node("Cast", ["ids"], ["idsf"], to=F), helper.make_node("Mul", ["idsf", "half"], ["e"]),
            helper.make_node("Add", ["x", "one"], ["x2"]), helper.make_node("Cast", ["ids"], ["ids32"], to=I32)],
           [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one")])
STAGE_1 = ([helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
            helper.make_node("Mul", ["x2", "two"], ["t"]), helper.make_node("Identity", ["ids32"], ["tokens"])],
           [numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def expected(ids: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    return {"s": (ids * 0.5).sum(axis=1, keepdims=True).astype(np.float32), "t": (x + 1) * 2,
            "tokens": ids.astype(np.int32)}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[StageProcess]]:
    directory = tmp_path_factory.mktemp("shapes")
    files = [model("s0", [IDS, X], CUT, *STAGE_0), model("s1", CUT, OUT, *STAGE_1)]
    stages = []
    for i, (m, ins, outs) in enumerate(zip(files, [[IDS, X], CUT], [CUT, OUT], strict=True)):
        onnx.save(m, directory / f"stage-{i}.onnx")
        stages.append(Stage(name=f"shapes-stage-{i}", file=f"stage-{i}.onnx",
                            sha256=sha256_file(directory / f"stage-{i}.onnx"), inputs=[spec(t) for t in ins],
                            outputs=[spec(t) for t in outs], cost=StageCost(latency_ms=0.01, param_bytes=0,
                                                                            bytes_out=0)))
    whole = model("shapes", [IDS, X], OUT, STAGE_0[0] + STAGE_1[0], STAGE_0[1] + STAGE_1[1])
    onnx.save(whole, directory / "model.onnx")
    write_manifest(Manifest(name="shapes", source_model=SourceModel(file="model.onnx",
                                                                    sha256=sha256_file(directory / "model.onnx")),
                            inputs=stages[0].inputs, outputs=stages[-1].outputs,
                            profile=Profile(threads=1, batch=1, runs=1, balance="latency"), stages=stages), directory)
    chain = start_chain(directory / "pipeline.json", log_dir=directory)
    yield chain
    assert stop_all(chain) == [0, 0]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("length", [3, 7])
@pytest.mark.parametrize("binary", [True, False])
def test_every_input_and_output_with_tritonclient(shaped: list[StageProcess], batch: int, length: int,
                                                  binary: bool) -> None:
    rng = np.random.default_rng(batch * 10 + length)
    ids = rng.integers(0, 50_000, (batch, length)).astype(np.int64)
    x = rng.standard_normal((batch, 3)).astype(np.float32)
    client = triton.InferenceServerClient(shaped[0].url.removeprefix("http://"))
    try:
        inputs = [triton.InferInput("ids", [batch, length], "INT64"), triton.InferInput("x", [batch, 3], "FP32")]
        inputs[0].set_data_from_numpy(ids, binary_data=binary)
        inputs[1].set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("s", "t", "tokens")]
        result = client.infer("shapes", inputs, outputs=outputs)
    finally:
        client.close()
    for name, want in expected(ids, x).items():
        got = result.as_numpy(name)
        assert got is not None and got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_metadata_keeps_the_dynamic_sequence(shaped: list[StageProcess]) -> None:
    meta = httpx.get(f"{shaped[0].url}/v2/models/shapes").json()
    assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert [o["name"] for o in meta["outputs"]] == ["s", "t", "tokens"]
    assert meta["parameters"]["stage_outputs"][0] == {"name": "e", "datatype": "FP32", "shape": [-1, -1]}


def json_infer(stage: StageProcess, ids_shape: list[int], x_shape: list[int]) -> httpx.Response:
    inputs = [{"name": "ids", "datatype": "INT64", "shape": ids_shape, "data": [1] * int(np.prod(ids_shape))},
              {"name": "x", "datatype": "FP32", "shape": x_shape, "data": [0.5] * int(np.prod(x_shape))}]
    return httpx.post(f"{stage.url}/v2/models/shapes/infer", json={"inputs": inputs}, timeout=30)


def test_inputs_whose_batch_sizes_disagree_are_400_naming_them(shaped: list[StageProcess]) -> None:
    r = json_infer(shaped[0], [2, 5], [3, 3])
    assert r.status_code == 400, r.text
    assert "disagree on the batch size" in r.json()["error"] and "'ids': 2" in r.json()["error"]
    assert "'x': 3" in r.json()["error"]


def test_batch_zero_is_400_naming_the_tensor(shaped: list[StageProcess]) -> None:
    r = json_infer(shaped[0], [0, 5], [0, 3])
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("tensor ids: shape [0, 5] has a dimension of 0")


def test_int64_ids_out_of_int64_range_are_400(shaped: list[StageProcess]) -> None:
    inputs = [{"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [2**70]},
              {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0.5] * 3}]
    r = httpx.post(f"{shaped[0].url}/v2/models/shapes/infer", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 400, r.text
    assert "tensor ids" in r.json()["error"]
