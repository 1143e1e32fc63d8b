"""Keras -> ONNX with tf2onnx, verified against Keras on the same random inputs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_export.errors import ExportError
from model_export.onnx_io import BATCH_DIM, load_onnx, save_onnx
from model_export.samples import random_batch

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    tolerance: float
    inputs: list[str]
    outputs: list[str]


def load_keras(path: Path):  # type: ignore[no-untyped-def]
    """Load a Keras model file, or raise ExportError saying why it is not one."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file; expected a Keras model (.keras)")
    if path.suffix not in {".keras", ".h5"}:
        raise ExportError(f"{path}: expected a Keras model file ending in .keras or .h5, got {path.suffix!r}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to the user
        raise ExportError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {exc})") from exc


def export_keras(model_path: Path, out: Path, opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 samples: int = 3, seed: int = 0) -> ExportResult:
    """Convert, then run Keras and onnxruntime on the same random batch; fail above `tolerance`."""
    if out.suffix != ".onnx":
        raise ExportError(f"--out must end in .onnx, got {out}")
    if not 7 <= opset <= 21:
        raise ExportError(f"--opset must be between 7 and 21 (what tf2onnx and onnxruntime share), got {opset}")
    model = load_keras(model_path)
    import tensorflow as tf
    import tf2onnx

    names = [t.name.split(":")[0] for t in model.inputs]
    signature = tuple(
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name) for t, name in zip(model.inputs, names, strict=True)
    )
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    except Exception as exc:
        raise ExportError(f"{model_path}: tf2onnx could not convert the model ({type(exc).__name__}: {exc})") from exc
    for value in [*proto.graph.input, *proto.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_DIM

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp) / out.name
        save_onnx(proto, tmp_path)
        load_onnx(tmp_path)  # the checker must accept what tf2onnx wrote
        diff = _compare(model, tmp_path, samples, seed)
        if diff > tolerance:
            raise ExportError(
                f"export differs from Keras: max |keras - onnxruntime| = {diff:.3g} over {samples} random "
                f"inputs, above the tolerance {tolerance:g}; nothing was written"
            )
        tmp_path.replace(out)
    return ExportResult(out, diff, tolerance, names, [o.name for o in proto.graph.output])


def _compare(model, path: Path, samples: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    specs = [(i.name, list(t.shape[1:]), str(t.dtype)) for i, t in zip(session.get_inputs(), model.inputs, strict=True)]
    feeds = list(random_batch(specs, samples, seed).values())
    expected = model(feeds if len(feeds) > 1 else feeds[0], training=False)
    expected_list = expected if isinstance(expected, list | tuple) else [expected]
    got = session.run(None, {i.name: a for i, a in zip(session.get_inputs(), feeds, strict=True)})
    return max(float(np.max(np.abs(np.asarray(e) - g))) for e, g in zip(expected_list, got, strict=True))
