"""Inputs for every check and benchmark, one rule for all of them.

Two kinds: `random_batch` / `random_tensors` give one fixed random batch (uniform [0, 1) floats, 0/1
booleans, integers 0..9; other dynamic dims 1), for measuring costs and load tests. `proof_cases` give
the inputs a proof runs on: each input in its realistic ranges (floats as images in 0-255 and in 0-1 and
as standard-normal features; token ids across the embedding's whole vocabulary), batches 1 and 4, and
each dynamic dimension other than the batch at several sizes; or a user's own samples from an .npz file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from model_export.dims import BATCH_DIM, InputSpec, named_dims, spatial
from model_export.errors import ExportError
from model_export.manifest import DATATYPE_TO_NUMPY, TensorSpec

PROOF_BATCHES = (1, 4)
PROOF_LENGTHS = (1, 5, 12)
PROOF_SPATIAL = (32, 48, 64)  # an image's height and width, in the same three cases (dims.spatial)
FLOAT_RANGES = ("0-255", "0-1", "normal")
# Ops an id passes through unchanged on its way to an embedding lookup.
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"}


def random_batch(specs: Sequence[tuple[str, Sequence[int | None], np.dtype | str]], batch: int,
                 seed: int) -> dict[str, np.ndarray]:
    """`specs` holds (name, shape without the batch dimension, dtype); dynamic dims are None, -1 or 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims, dtype in specs:
        shape = [batch, *[d if d and d > 0 else 1 for d in dims]]
        dt = np.dtype(dtype)
        if np.issubdtype(dt, np.floating):
            out[name] = rng.random(shape).astype(dt)
        else:
            out[name] = rng.integers(0, 2 if dt == np.bool_ else 10, shape).astype(dt)
    return out


def random_tensors(specs: Sequence[TensorSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random values for tensors described as in pipeline.json or v2 metadata."""
    return random_batch([(t.name, t.shape[1:], DATATYPE_TO_NUMPY[t.datatype]) for t in specs], batch, seed)


def vocabularies(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer input that indexes a table (an embedding), the number of rows it may index."""
    constants = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = list(numpy_helper.to_array(node.attribute[0].t).shape)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, int] = {}
    for value in model.graph.input:
        stack, seen = [value.name], set()
        while stack:
            tensor = stack.pop()
            seen.add(tensor)
            for node in consumers.get(tensor, []):
                if node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                    stack.extend(o for o in node.output if o not in seen)
                elif node.op_type == "Gather" and node.input[1] == tensor and node.input[0] in constants:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows = constants[node.input[0]][axis]
                    found[value.name] = min(rows, found.get(value.name, rows))
    return found


@dataclass(frozen=True)
class Case:
    """One set of inputs a proof runs on, and what it stands for."""

    label: str
    feeds: dict[str, np.ndarray]


def _values(spec: InputSpec, shape: list[int], float_range: str, vocab: int | None,
            rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        if float_range == "0-255":
            return rng.integers(0, 256, shape).astype(spec.dtype)
        if float_range == "0-1":
            return rng.random(shape).astype(spec.dtype)
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return rng.random(shape) > 0.5
    high = vocab if vocab is not None else 10
    return rng.integers(0, high, shape).astype(spec.dtype)


def proof_cases(inputs: Sequence[InputSpec], vocab: dict[str, int], seed: int = 0) -> list[Case]:
    """Batches 1 and 4 x each other dynamic dimension at 1, 5 and 12 (an image's height and width at 32, 48 and
    64) x each float range."""
    rng = np.random.default_rng(seed)
    others = [n for n in named_dims(inputs) if n != BATCH_DIM]
    has_float = any(np.issubdtype(s.dtype, np.floating) for s in inputs)
    cases = []
    for batch in PROOF_BATCHES:
        for k in range(len(PROOF_LENGTHS)) if others else (None,):
            for float_range in FLOAT_RANGES if has_float else ("",):
                lengths = {n: 1 if k is None else (PROOF_SPATIAL if spatial(n) else PROOF_LENGTHS)[k] for n in others}
                sizes = {BATCH_DIM: batch, **lengths}
                feeds = {s.name: _values(s, s.shape(sizes), float_range, vocab.get(s.name), rng) for s in inputs}
                parts = [f"batch {batch}"] + [f"{n} {lengths[n]}" for n in others] + (
                    [f"floats {float_range}"] if float_range else [])
                cases.append(Case(", ".join(parts), feeds))
    return cases


def load_samples(path: Path, inputs: Sequence[InputSpec]) -> list[Case]:
    """A user's own inputs: an .npz holding one array per model input, the batch first."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"--samples {path}: not a readable .npz file ({exc}); expected np.savez(path, "
                          f"{', '.join(f'{s.name}=...' for s in inputs)})") from exc
    expected = [s.name for s in inputs]
    if sorted(arrays) != sorted(expected):
        raise ExportError(f"--samples {path}: holds arrays {sorted(arrays)}; expected one per model input: {expected}")
    for spec in inputs:
        a = arrays[spec.name]
        fits = a.ndim == len(spec.dims) and all(isinstance(d, str) or d == n for d, n in zip(spec.dims, a.shape,
                                                                                            strict=True))
        if not fits:
            raise ExportError(f"--samples {path}: {spec.name} has shape {list(a.shape)}; expected {spec.dims}")
        if a.dtype != spec.dtype:
            if not np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                raise ExportError(f"--samples {path}: {spec.name} is {a.dtype}; expected {spec.dtype}")
            arrays[spec.name] = a.astype(spec.dtype)
    batches = {spec.name: arrays[spec.name].shape[0] for spec in inputs if spec.dims and spec.dims[0] == BATCH_DIM}
    if len(set(batches.values())) > 1:
        raise ExportError(f"--samples {path}: the inputs hold different numbers of samples {batches}; expected the "
                          "same batch (axis 0) in every input")
    return [Case(f"{path.name}", arrays)]


def feeds_at(inputs: Sequence[InputSpec], sizes: dict[str, int], vocab: dict[str, int],
             seed: int = 0) -> dict[str, np.ndarray]:
    """One batch with each named dimension at `sizes[name]`, values in range (floats in 0-1)."""
    rng = np.random.default_rng(seed)
    return {s.name: _values(s, s.shape(sizes), "0-1", vocab.get(s.name), rng) for s in inputs}
