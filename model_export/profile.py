"""Measuring what a piece of the graph costs on this machine, with the stage service's settings, and what
each candidate cut tensor looks like (its value, and which of its dimensions are the batch and the others).

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

from model_export.dims import (
    BATCH_DIM,
    FREE,
    UNNAMED,
    Dims,
    batch_only,
    checked_against_batch,
    checked_against_measure,
    graph_inputs,
    infer_dims,
    named_dims,
    probe_sizes,
    spatial,
)
from model_export.errors import ExportError
from model_export.ort_session import create_session
from model_export.samples import feeds_at, vocabularies

# Sizes of the named dimensions other than the batch when costs are measured (the batch is 1).
MEASURE_LENGTH = 16
MEASURE_SPATIAL = 64  # an image's height and width (dims.spatial): 16 pixels is too few for a strided network


@dataclass(frozen=True)
class Activation:
    """A tensor's value at batch 1 on a fixed input, and its dims (ints, or names of dynamic dims)."""

    name: str
    value: np.ndarray
    dims: Dims

    @property
    def nbytes(self) -> int:
        return int(self.value.nbytes)

    def dim_params(self) -> list[int | str]:
        return [f"{self.name}_dim{i}" if d in (UNNAMED, FREE) else d for i, d in enumerate(self.dims)]

    def value_info(self) -> onnx.ValueInfoProto:
        elem = helper.np_dtype_to_tensor_dtype(self.value.dtype)
        return helper.make_tensor_value_info(self.name, elem, self.dim_params())


def with_outputs(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors` (name -> ONNX element type), shapes left open."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n, elem in tensors.items()
                              if n not in existing)
    return probe


def _elem_types(model: onnx.ModelProto, tensors: list[str]) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    types = {}
    for name in tensors:
        info = known.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            raise ExportError(f"shape inference gives no type for tensor {name!r}; cannot measure it")
        types[name] = info.type.tensor_type.elem_type
    return types


def activations(model: onnx.ModelProto, tensors: list[str], threads: int = 1) -> dict[str, Activation]:
    """Run the model with `tensors` exposed: once at batch 1 for their values, twice more to find their dims."""
    specs, vocab = graph_inputs(model), vocabularies(model)
    session = create_session(with_outputs(model, _elem_types(model, tensors)).SerializeToString(), threads)
    names = [o.name for o in session.get_outputs()]
    measure = {n: 1 if n == BATCH_DIM else MEASURE_SPATIAL if spatial(n) else MEASURE_LENGTH
               for n in named_dims(specs)}
    first, second = probe_sizes(specs)
    changed = batch_only(first, second)
    runs = []
    for sizes in (measure, first, second, *([changed] if changed else [])):
        feeds = feeds_at(specs, sizes, vocab)
        try:
            runs.append((feeds, dict(zip(names, session.run(None, feeds), strict=True))))
        except Exception as exc:  # onnxruntime raises its own types; the message says what failed
            raise ExportError(f"the model fails on inputs {_shapes(feeds)}: {exc}") from exc
    (feeds, values), (_, a), (_, b) = runs[:3]

    def dims_of(n: str) -> Dims:
        dims = checked_against_measure(infer_dims(a[n].shape, b[n].shape, (first, second)), values[n].shape)
        return checked_against_batch(dims, a[n].shape, runs[3][1][n].shape) if changed else dims

    result = {n: Activation(n, np.asarray(values[n]), dims_of(n)) for n in tensors}
    result.update({s.name: Activation(s.name, feeds[s.name], list(s.dims)) for s in specs})
    return result


def _shapes(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())


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
