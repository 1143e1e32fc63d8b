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
from onnx import helper, numpy_helper

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


class Metronome:
    """A fixed workload (two 512-wide MatMul+Relu layers on 32 rows, about 0.5 ms on one core) timed right after
    every measured run, so a run's time can be read at one speed of the machine: on a shared machine that speed
    moves in phases (a 2-core VM here: the same loop took 26 ms, then 48 ms, in phases of about half a second), and
    two stages timed a second apart compare as the phases fell. The run's time divided by the beat beside it does
    not move with the phases; times the beat's reference (its median over beats a few milliseconds apart at the
    start) it is milliseconds again."""

    ROWS, WIDTH, LAYERS = 32, 512, 2
    REFERENCE_BEATS = 30

    def __init__(self, threads: int) -> None:
        self.session = create_session(_metronome_model(self.ROWS, self.WIDTH, self.LAYERS).SerializeToString(),
                                      threads)
        self.feeds = {"x": np.ones((self.ROWS, self.WIDTH), np.float32)}
        self.beat()
        samples = []
        for _ in range(self.REFERENCE_BEATS):
            samples.append(self.beat())
            time.sleep(0.01)  # spread over ~0.3 s, across more than one phase
        self.reference_ms = statistics.median(samples)

    def beat(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        return (time.perf_counter() - start) * 1000


def _metronome_model(rows: int, width: int, layers: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, weights, last = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / width ** 0.5).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        last = f"r{i}"
    shape = [rows, width]
    graph = helper.make_graph(nodes, "metronome", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, shape)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime this project supports reads
    return model


_metronomes: dict[int, Metronome] = {}


def metronome(threads: int) -> Metronome:
    """The process's metronome for `threads` intra-op threads, made on first use."""
    if threads not in _metronomes:
        _metronomes[threads] = Metronome(threads)
    return _metronomes[threads]


def calibrated_ms(run_ms: list[float], beat_ms: list[float], reference_ms: float) -> float:
    """The median run at the metronome's reference speed: each run over the beat timed right after it."""
    return statistics.median(r / b for r, b in zip(run_ms, beat_ms, strict=True)) * reference_ms


def time_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, runs: int,
               warmup: int = 2) -> float:
    """Median time of one run, in milliseconds at the machine's reference speed (`Metronome`)."""
    session = create_session(model.SerializeToString(), threads)
    beats = metronome(threads)
    for _ in range(warmup):
        session.run(None, feeds)
    times, beat_times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
        beat_times.append(beats.beat())
    return calibrated_ms(times, beat_times, beats.reference_ms)


def param_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
