"""Labelled data for fine-tuning a stage: the `.npz` format `retrain-stage` reads, and a seeded synthetic set
for the reference classifier so the whole flow runs offline.

Format: one array per model input, named as the input, the batch first, and `labels`: integer class ids
(`[N]`, for a classifier: sparse categorical cross-entropy) or floats of the output's shape (mean squared
error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_export.errors import ExportError

LABELS = "labels"


@dataclass(frozen=True)
class TrainingData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    @property
    def classification(self) -> bool:
        return np.issubdtype(self.labels.dtype, np.integer)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_training_data(path: Path, input_names: list[str], input_shapes: dict[str, tuple[int | None, ...]],
                       output_shape: tuple[int | None, ...]) -> TrainingData:
    """Read `path` for a model with these inputs (shapes without the batch) and one output; ExportError names
    what is missing or of the wrong shape."""
    if path.suffix != ".npz" or not path.is_file():
        raise ExportError(f"--data {path}: no such .npz file; expected one array per model input "
                          f"({', '.join(input_names)}) and '{LABELS}' (`reference-data` makes one)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"--data {path}: not a readable .npz ({exc})") from exc
    missing = [k for k in [*input_names, LABELS] if k not in arrays]
    if missing:
        raise ExportError(f"--data {path}: no array {missing}; it has {sorted(arrays)}, expected "
                          f"{[*input_names, LABELS]}")
    labels = arrays[LABELS]
    count = labels.shape[0] if labels.ndim else 0
    if count == 0:
        raise ExportError(f"--data {path}: '{LABELS}' holds no samples")
    for name in input_names:
        _check_shape(path, name, arrays[name], input_shapes[name], count)
    if not np.issubdtype(labels.dtype, np.integer):
        _check_shape(path, LABELS, labels, output_shape, count)
    elif labels.ndim != 1:
        raise ExportError(f"--data {path}: integer '{LABELS}' must be class ids of shape [N], got {list(labels.shape)}")
    elif output_shape and output_shape[-1] is not None and (labels.min() < 0 or labels.max() >= output_shape[-1]):
        raise ExportError(f"--data {path}: class ids must lie in [0, {output_shape[-1]}), got {labels.min()}.."
                          f"{labels.max()}")
    return TrainingData({n: arrays[n].astype(np.float32) if arrays[n].dtype == np.float64 else arrays[n]
                         for n in input_names}, labels)


def _check_shape(path: Path, name: str, array: np.ndarray, shape: tuple[int | None, ...], count: int) -> None:
    fits = array.ndim == len(shape) + 1 and all(d is None or d == a for d, a in zip(shape, array.shape[1:],
                                                                                      strict=True))
    if not fits or array.shape[0] != count:
        want = ["N", *["any" if d is None else d for d in shape]]
        raise ExportError(f"--data {path}: '{name}' has shape {list(array.shape)}, expected {want} with N = {count} "
                          f"(the number of labels)")


def synthetic_classes(input_shape: tuple[int, ...], classes: int, samples: int, seed: int) -> TrainingData:
    """Images in [0, 1]: each class a smooth random pattern, each sample its class's pattern plus noise, so a
    classifier can learn the labels from the image. Seeded: the same arguments give the same bytes."""
    if samples < 1 or classes < 2:
        raise ExportError(f"--samples must be >= 1 and the model needs >= 2 classes, got {samples}, {classes}")
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0.0, 1.0, size=(classes, *input_shape)).astype(np.float32)
    labels = rng.integers(0, classes, size=samples).astype(np.int64)
    noise = rng.normal(0.0, 0.1, size=(samples, *input_shape)).astype(np.float32)
    images = np.clip(patterns[labels] + noise, 0.0, 1.0)
    return TrainingData({"": images}, labels)


def write_reference_data(model: Any, out: Path, samples: int, seed: int) -> Path:
    """A synthetic labelled set for a loaded Keras classifier with one image-like input and one output."""
    if out.suffix != ".npz":
        raise ExportError(f"--out must end in .npz, got {out}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                          "reference-data makes data for one input and one classifier output")
    input_shape = tuple(model.inputs[0].shape[1:])
    classes = model.outputs[0].shape[-1]
    if None in input_shape or classes is None:
        raise ExportError(f"model {model.name!r}: input shape {input_shape} or classes {classes} is not fixed")
    data = synthetic_classes(input_shape, int(classes), samples, seed)
    name = model.inputs[0].name.split(":")[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {name: data.inputs[""], LABELS: data.labels}
    np.savez(out, **arrays)
    return out
