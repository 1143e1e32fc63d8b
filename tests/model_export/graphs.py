"""Tiny hand-built ONNX graphs with the shapes that make cutting hard."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.tiny import IR_VERSION, OPSET


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _w(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _io(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])


def residual() -> onnx.ModelProto:
    """x -> a=relu(xW0) -> [b=relu(aW1); r=a+b] -> y=relu(rW2): the skip path carries `a` past `b`."""
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("MatMul", ["a", "W1"], ["b0"]),
        helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y0"]),
        helper.make_node("Relu", ["y0"], ["y"]),
    ]
    return _model(nodes, [_io("x", 8)], [_io("y", 4)], [_w("W0", (8, 8), 0), _w("W1", (8, 8), 1), _w("W2", (8, 4), 2)])


def with_control_flow() -> onnx.ModelProto:
    """An If whose branches read `h` from the enclosing scope: `h` must not be cut away from it."""
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t_out"])], "then", [], [_io("t_out", 8)])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [], [_io("e_out", 8)])
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["branch", "W1"], ["y"]),
    ]
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    return _model(nodes, [_io("x", 8)], [_io("y", 4)], [_w("W0", (8, 8), 0), _w("W1", (8, 4), 1), zero])


def with_shared_constant() -> onnx.ModelProto:
    """A Constant node read on both sides of the middle cut: it is copied, not a crossing tensor."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([0.5]), "cv")),
        helper.make_node("Mul", ["x", "c"], ["h"]),
        helper.make_node("Relu", ["h"], ["h2"]),
        helper.make_node("Mul", ["h2", "c"], ["y"]),
    ]
    return _model(nodes, [_io("x", 8)], [_io("y", 8)], [])
