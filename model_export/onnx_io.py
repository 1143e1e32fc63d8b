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


def save_onnx(model: onnx.ModelProto, path: Path, data_file: str | None = None) -> None:
    """Write the model; with `data_file`, every initializer of 1 KiB or more goes into that file beside it
    (ONNX external data, each tensor page-aligned), so that onnxruntime maps the weights instead of copying
    them out of the parsed model: no load-time spike of a second copy, and the pages are the page cache's,
    shared by every process that maps the file. `model` itself is left as it was."""
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    if data_file is None:
        onnx.save(model, str(path))
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the weights out of the proto it is given
    (path.parent / data_file).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file,
              size_threshold=1024)
