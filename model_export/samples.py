"""Random sample inputs, one rule for every check and benchmark: uniform [0, 1) floats, 0/1 booleans,
integers 0..9; the first dimension is the batch, any other dynamic dimension is 1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_export.manifest import DATATYPE_TO_NUMPY, TensorSpec


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
