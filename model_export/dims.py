"""Which dimensions of a model's tensors are dynamic, and what they are called.

A model's inputs name their dynamic dimensions (`batch`, `sequence`, ...). A tensor inside the graph
carries no reliable name (converters write `unk__97`, shape inference loses track through loops), so
its dimensions are found by running the model twice with every named dimension at a different size:
an axis that follows `batch` is the batch, one that follows `sequence` is the sequence, one that
changes otherwise (e.g. `batch * sequence` after a reshape) is dynamic without a name, and one that
stays put is static. Where the batch sits is therefore known, not assumed to be axis 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

BATCH_DIM = "batch"
UNNAMED = "?"  # a dynamic dimension that follows no input dimension alone, and may change with the batch
FREE = "*"  # a dynamic dimension that follows no input dimension alone but keeps its size when only the batch
            # changes (height - 2 after a valid convolution, height / 2 after a pooling)
Dims = list[int | str]
# Sizes given to the batch and to the other named dimensions in the two probe runs: all different, so
# that an axis's pair of sizes says which dimension it follows.
PROBE_BATCH = (2, 3)
PROBE_OTHER = ((5, 6), (7, 9), (10, 11), (12, 13), (14, 15), (17, 19))
# An image's height and width (as export names them) get sizes a convolutional network takes (strided and
# pooling layers bring 5 or 7 pixels down to nothing; five stride-2 stages need 32), far enough apart that
# they still differ after a stride of 64 (40 and 48 are both 2 after a stride of 32: a dynamic axis read as
# static).
PROBE_SPATIAL = ((64, 160), (96, 224), (80, 192), (112, 256))
SPATIAL_DIMS = ("height", "width")


def spatial(name: str) -> bool:
    """An image's height or width, as export names them (`height`, or `<input>_height` where inputs share it)."""
    return name in SPATIAL_DIMS or name.endswith(tuple(f"_{d}" for d in SPATIAL_DIMS))


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, dims (ints, or the names of dynamic dims) and numpy dtype."""

    name: str
    dims: Dims
    dtype: np.dtype

    def shape(self, sizes: Mapping[str, int]) -> list[int]:
        """Concrete shape with each named dimension at `sizes[name]` (1 where not given)."""
        return [d if isinstance(d, int) else sizes.get(d, 1) for d in self.dims]


def value_dims(value: onnx.ValueInfoProto, fallback_prefix: str) -> Dims:
    """Dims of a graph input or output: ints, dim_params, or `<prefix>_dim<axis>` where unnamed."""
    dims: Dims = []
    for axis, d in enumerate(value.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"{fallback_prefix}_dim{axis}")
    return dims


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (not initializers); whatever the inputs call their dynamic axis 0 is `batch`."""
    initializers = {i.name for i in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    all_dims = [value_dims(v, v.name) for v in values]
    batch_names = {dims[0] for dims in all_dims if dims and isinstance(dims[0], str)}
    specs = []
    for value, dims in zip(values, all_dims, strict=True):
        dims = [BATCH_DIM if d in batch_names else d for d in dims]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def named_dims(inputs: Sequence[InputSpec]) -> list[str]:
    """Every dynamic dimension name of the inputs, the batch first."""
    names: list[str] = []
    for spec in inputs:
        for d in spec.dims:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return sorted(names, key=lambda n: n != BATCH_DIM)


def probe_sizes(inputs: Sequence[InputSpec]) -> tuple[dict[str, int], dict[str, int]]:
    """The two size assignments of the probe runs."""
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    others, images = iter(PROBE_OTHER), iter(PROBE_SPATIAL)
    for name in named_dims(inputs):
        if name == BATCH_DIM:
            a, b = PROBE_BATCH
        else:
            a, b = next(images, (80, 88)) if spatial(name) else next(others, (20, 23))
        first[name], second[name] = a, b
    return first, second


def infer_dims(first: Sequence[int], second: Sequence[int], sizes: tuple[Mapping[str, int], Mapping[str, int]]) -> Dims:
    """Dims of a tensor from its shapes in the two probe runs."""
    by_pair = {(sizes[0][n], sizes[1][n]): n for n in sizes[0]}
    if len(first) != len(second):
        return [UNNAMED] * len(first)
    dims: Dims = []
    for a, b in zip(first, second, strict=True):
        if a == b:
            dims.append(int(a))
        else:
            dims.append(by_pair.get((int(a), int(b)), UNNAMED))
    return dims


def batch_only(first: Mapping[str, int], second: Mapping[str, int]) -> dict[str, int] | None:
    """The sizes of `first` with only the batch's changed to `second`'s: the probe that tells which unnamed
    dimensions depend on the batch. None where the inputs have no batch."""
    return {**first, BATCH_DIM: second[BATCH_DIM]} if BATCH_DIM in first else None


def checked_against_batch(dims: Dims, first: Sequence[int], batch_changed: Sequence[int]) -> Dims:
    """`dims` set right by the probe where only the batch changed: an unnamed axis that stays put is FREE, so is
    one taken for the batch that stays put (its two sizes only happened to be the batch's, as a width of 7 and 9
    becomes 2 and 3 after a valid 3x3 convolution and a pooling), and a named axis that moves with the batch
    is UNNAMED."""
    if len(first) != len(batch_changed):
        return dims
    out: Dims = []
    for d, a, c in zip(dims, first, batch_changed, strict=True):
        moves = a != c
        if isinstance(d, int):
            out.append(d)
        elif d == BATCH_DIM:
            out.append(BATCH_DIM if moves else FREE)
        else:
            out.append(UNNAMED if moves else FREE if d == UNNAMED else d)
    return out


def checked_against_measure(dims: Dims, measured: Sequence[int]) -> Dims:
    """`dims` with an axis the two probes found static but that has another size in the measuring run (at
    other sizes again) marked FREE: its two probe sizes only happened to come out equal (a stride of 2 takes 5
    and 6 both to 3). The batch moved between the probes, so such an axis does not follow it."""
    if len(dims) != len(measured):
        return dims
    return [FREE if isinstance(d, int) and d != m else d for d, m in zip(dims, measured, strict=True)]


def batch_axes(dims: Dims) -> list[int]:
    return [i for i, d in enumerate(dims) if d == BATCH_DIM]


def batch_first(dims: Dims) -> bool:
    """True when the batch is axis 0 and no other axis (none that changes with it either), the layout a stage
    boundary needs: a stage's requests are batched and split along axis 0 alone."""
    return batch_axes(dims) == [0] and UNNAMED not in dims
