"""Tiny hand-built pipelines (onnx.helper) that tests of every package and `make reliability` serve, split or
render."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_export.manifest import Manifest, StageCost
from model_export.pipeline_writer import StageModel, write_pipeline

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default


def dense_stage_graph(index: int, in_name: str, out_name: str, width_in: int, width_out: int,
                      seed: int) -> onnx.ModelProto:
    """y = relu(x @ W + b) with fixed random weights; the batch dimension is dynamic."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((width_in, width_out)).astype(np.float32) * 0.3, f"W{index}")
    b = numpy_helper.from_array(rng.standard_normal(width_out).astype(np.float32) * 0.1, f"B{index}")
    nodes = [
        helper.make_node("MatMul", [in_name, f"W{index}"], [f"mm{index}"]),
        helper.make_node("Add", [f"mm{index}", f"B{index}"], [f"add{index}"]),
        helper.make_node("Relu", [f"add{index}"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes,
        f"stage{index}",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", width_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", width_out])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def write_tiny_pipeline(directory: Path, name: str = "tiny", widths: tuple[int, ...] = (16, 32, 24, 4),
                        seed: int = 0, external_data: bool = False) -> Manifest:
    """Write a chain of len(widths)-1 dense stages plus the whole model and pipeline.json (`external_data`:
    stage weights of 1 KiB or more in a data file beside each stage)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensor_names = ["x"] + [f"h{i}" for i in range(1, len(widths) - 1)] + ["y"]
    stages = []
    whole_nodes, whole_inits = [], []
    for i in range(len(widths) - 1):
        model = dense_stage_graph(i, tensor_names[i], tensor_names[i + 1], widths[i], widths[i + 1], seed + i)
        whole_nodes.extend(model.graph.node)
        whole_inits.extend(model.graph.initializer)
        cost = StageCost(latency_ms=0.01, param_bytes=4 * (widths[i] + 1) * widths[i + 1], bytes_out=4 * widths[i + 1])
        stages.append(StageModel(model, cost))
    whole = helper.make_model(
        helper.make_graph(
            whole_nodes, name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])],
            initializer=whole_inits,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
    )
    onnx.save(whole, directory / "model.onnx")
    return write_pipeline(directory, name, stages, directory / "model.onnx", external_data=external_data)
