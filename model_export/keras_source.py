"""Reading what a user brings: a Keras 3 model (`.keras`, legacy `.h5`) or a TensorFlow SavedModel directory,
as one thing that can be converted by tf2onnx and asked for its own predictions."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_export.errors import ExportError

FORMATS = (
    "a Keras model file (.keras, or legacy .h5) or a TensorFlow SavedModel directory (the folder holding "
    "saved_model.pb); from Keras, save one with model.save('model.keras') or model.export('saved_model_dir')"
)


@dataclass(frozen=True)
class KerasInput:
    """One model input as the source declares it: dims are None where dynamic."""

    name: str
    dims: list[int | None]
    dtype: str


@dataclass(frozen=True)
class Source:
    """A model to convert, with its own predictions to compare the conversion against."""

    name: str
    inputs: list[KerasInput]
    convert: Callable[[int], onnx.ModelProto]
    predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # outputs by name


@contextmanager
def quiet_tf2onnx() -> Iterator[None]:
    """tf2onnx logs a traceback when one of its graph optimizers gives up and carries on without it; the
    model is still converted, and the proof judges it, so the user sees one result, not that traceback."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_source(path: Path, unsafe: bool = False) -> Source:
    """The model at `path`, or ExportError saying which formats are accepted and how to make one. `unsafe`
    loads a Keras file with Keras's safe mode off (a Lambda layer's Python code is run)."""
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ExportError(f"{path}: a directory without saved_model.pb, so not a SavedModel; expected {FORMATS}")
        return _saved_model_source(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory; expected {FORMATS}")
    if path.suffix not in {".keras", ".h5"}:
        raise ExportError(f"{path}: {path.suffix or 'no suffix'!r} is not a format read here; expected {FORMATS}")
    return keras_source(load_keras(path, unsafe))


def load_keras(path: Path, unsafe: bool = False) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if path.suffix == ".keras" and path.is_file() and not zipfile.is_zipfile(path):
        raise ExportError(f"{path}: not a .keras archive (a .keras file is a zip archive, this one is not); "
                          f"expected {FORMATS}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to the user
        raise ExportError(_load_failure(path, exc)) from exc


def _load_failure(path: Path, exc: Exception) -> str:
    """What to tell the user for a Keras file Keras would not load: the two usual causes in a few words."""
    text = str(exc)
    if "deserialization of a `Lambda` layer" in text:
        return (f"{path}: holds a Lambda layer whose function is Python code, which Keras loads only with its safe "
                "mode off; pass --unsafe if you trust the file (its code is run), or replace the Lambda with a "
                "layer class")
    missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if missing:
        return (f"{path}: uses {missing.group(1)!r}, a custom class or function this process cannot import; from "
                "the code that defines it, export a SavedModel (model.export('saved_model_dir')) and pass that "
                "directory")
    return f"{path}: not a loadable Keras model ({type(exc).__name__}: {text.splitlines()[0] if text else ''}); " \
           f"expected {FORMATS}"


def as_functional(model: Any) -> Any:
    """A functional model computing what `model` computes, with the same layers and input names.

    tf2onnx 1.17 reads `model.output_names`, which a Keras 3 Sequential lacks (KeyError 'keras_tensor_N');
    the functional wrapper over the same layers has it (the last layer's name)."""
    import keras

    if isinstance(getattr(model, "_inputs_struct", None), dict):
        # Inputs given as a dict: tf2onnx feeds a list, which such a model refuses ("the structure of `inputs`
        # doesn't match"); the same graph with its inputs as a list, in `model.inputs` order, takes it.
        outputs = model.outputs
        return keras.Model(list(model.inputs), outputs if len(outputs) > 1 else outputs[0], name=model.name)
    if isinstance(model, keras.Sequential) or not hasattr(model, "output_names"):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as exc:
            raise ExportError(
                f"model {model.name!r} was never called on a keras.Input, so its inputs are unknown; build it with "
                "keras.Input(...) first (or give the subclassed model's call a fixed signature and use model.export)"
            ) from exc
        # one tensor, not a list of one, where the model has one: Keras then takes a plain array as input
        return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs if len(outputs) > 1 else outputs[0],
                           name=model.name)
    return model


def keras_source(model: Any) -> Source:
    """A loaded Keras model (Sequential, functional, or subclassed with known inputs) as a Source."""
    import tensorflow as tf
    import tf2onnx

    model = as_functional(model)
    inputs = [KerasInput(t.name.split(":")[0], list(t.shape[1:]), str(t.dtype)) for t in model.inputs]
    signature = tuple(tf.TensorSpec((None, *i.dims), i.dtype, name=i.name) for i in inputs)

    def convert(opset: int) -> onnx.ModelProto:
        with quiet_tf2onnx():
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
        return proto

    def predict(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [feeds[i.name] for i in inputs]
        out = model(args if len(args) > 1 else args[0], training=False)
        outs = out if isinstance(out, list | tuple) else [out]
        return {name: np.asarray(o) for name, o in zip(model.output_names, outs, strict=True)}

    return Source(model.name, inputs, convert, predict)


def _saved_model_source(path: Path) -> Source:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except KeyError as exc:
        raise ExportError(f"{path}: the SavedModel has no 'serving_default' signature to export") from exc
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise ExportError(f"{path}: not a loadable SavedModel ({problem}); expected {FORMATS}") from exc
    specs = signature.structured_input_signature[1]
    names = list(specs)
    inputs = [KerasInput(n, list(specs[n].shape[1:]), specs[n].dtype.name) for n in names]
    tf_signature = [tf.TensorSpec((None, *i.dims), i.dtype, name=i.name) for i in inputs]

    @tf.function(input_signature=tf_signature)
    def call(*args: Any) -> dict[str, Any]:
        # through `loaded`, which must stay alive: the signature holds its variables only weakly
        return loaded.signatures["serving_default"](**dict(zip(names, args, strict=True)))

    def convert(opset: int) -> onnx.ModelProto:
        with quiet_tf2onnx():
            proto, _ = tf2onnx.convert.from_function(call, input_signature=tf_signature, opset=opset)
        return proto

    def predict(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = loaded.signatures["serving_default"](**{n: tf.constant(feeds[n]) for n in names})
        return {name: np.asarray(value) for name, value in out.items()}

    return Source(path.name, inputs, convert, predict)
