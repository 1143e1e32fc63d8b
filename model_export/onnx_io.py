"""Loading and saving ONNX files with one clear error, and the IR version onnxruntime reads."""

from __future__ import annotations

from pathlib import Path

import onnx

from model_export.errors import ExportError

# onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 writes 14 by default. IR 10 covers opset <= 21.
MAX_IR_VERSION = 10


def load_onnx(path: Path, check: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model, or raise ExportError naming the file and the problem."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file; expected an ONNX model (.onnx)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx raises others; same meaning to a user
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "expected an .onnx file as `export` writes"
        ) from exc
    if not model.graph.node:
        raise ExportError(f"{path}: not an ONNX model (no graph nodes); expected the output of `export`")
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{path}: ONNX checker rejects the model: {exc}") from exc
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    onnx.save(model, str(path))
