"""Measuring what a piece of the graph costs on this machine, with the stage service's settings.

Per-node kernel times from onnxruntime's profiler cannot be mapped back to the stored nodes once the
optimizer has fused them (Conv+Relu becomes one kernel), so the unit measured is the segment between
two adjacent clean cuts, run as its own session exactly as a stage would run it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from model_export.errors import ExportError
from model_export.graph import GraphIndex
from model_export.onnx_io import BATCH_DIM
from model_export.ort_session import create_session
from model_export.samples import random_batch


@dataclass(frozen=True)
class Activation:
    """A tensor's value at batch 1 on a fixed random input, and its type for the stage graphs."""

    name: str
    value: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.value.nbytes)

    def value_info(self) -> onnx.ValueInfoProto:
        elem = helper.np_dtype_to_tensor_dtype(self.value.dtype)
        return helper.make_tensor_value_info(self.name, elem, [BATCH_DIM, *self.value.shape[1:]])


def graph_input_values(model: onnx.ModelProto, index: GraphIndex, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random values for the graph inputs (see `samples.random_batch`)."""
    specs = []
    for value in model.graph.input:
        if value.name in index.inputs:
            tensor_type = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim[1:]]
            specs.append((value.name, dims, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
    return random_batch(specs, batch, seed)


def activations(model: onnx.ModelProto, index: GraphIndex, tensors: list[str], seed: int = 0,
                threads: int = 1) -> dict[str, Activation]:
    """Run the model once at batch 1 with `tensors` exposed as outputs; return each one's value."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name in existing:
            continue
        info = known.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            raise ExportError(f"shape inference gives no type for tensor {name!r}; cannot measure it")
        out = helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)
        probe.graph.output.append(out)
    feeds = graph_input_values(model, index, batch=1, seed=seed)
    session = create_session(probe.SerializeToString(), threads)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    result = {name: Activation(name, np.asarray(values[name])) for name in tensors}
    result.update({name: Activation(name, value) for name, value in feeds.items()})
    return result


def time_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, runs: int,
               warmup: int = 2) -> float:
    """Median wall time of one run, in milliseconds."""
    session = create_session(model.SerializeToString(), threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def param_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
