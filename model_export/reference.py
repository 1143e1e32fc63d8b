"""The reference image classifier of the design, built deterministically with Keras."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from model_export.errors import ExportError

Head = Literal["pool", "flatten"]


def build_reference(input_size: int = 224, width: int = 64, head: Head = "pool", classes: int = 1000,
                    hidden_layers: int = 0, hidden_width: int = 4096,
                    seed: int = 0):  # type: ignore[no-untyped-def]
    """Three blocks of Conv2D (width, 2*width, 4*width) 3x3 + ReLU + MaxPool 2x2, then a pooling or
    flatten head, `hidden_layers` Dense(hidden_width) + ReLU, and Dense(classes) with softmax.

    The large variant for memory tests is `hidden_layers=8` (about 490 MB of weights spread over eight
    layers, so a split can spread them too); `head="flatten"` instead puts them in one Dense layer,
    which no split can divide."""
    if input_size < 8 or input_size % 8:
        raise ExportError(f"--input-size must be a multiple of 8 and at least 8, got {input_size}")
    if width < 1:
        raise ExportError(f"--width must be positive, got {width}")
    if hidden_layers < 0 or hidden_width < 1:
        raise ExportError(f"--hidden-layers must be >= 0 and --hidden-width >= 1, got {hidden_layers}, {hidden_width}")
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = inputs
    for i, filters in enumerate((width, 2 * width, 4 * width)):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i + 1}_conv")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    if head == "pool":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    for i in range(hidden_layers):
        x = keras.layers.Dense(hidden_width, activation="relu", name=f"hidden{i + 1}")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="reference")


def save_reference(out: Path, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    if out.suffix != ".keras":
        raise ExportError(f"--out must end in .keras (the Keras 3 format), got {out}")
    model = build_reference(**kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.keras")
    model.save(tmp)
    tmp.replace(out)
    return out
