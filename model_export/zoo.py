"""A zoo of small Keras models of every shape users bring (all `weights=None`, built deterministically).

The tests run every step on each of them and `make bench-split` measures them; `python -m model_export
zoo NAME --out FILE.keras` writes one, to try the tools on a model nobody tuned them for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_export.errors import ExportError

VOCAB = 100


def mlp() -> Any:
    """Sequential MLP with Dropout and BatchNormalization."""
    import keras

    return keras.Sequential([
        keras.Input((20,), name="features"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ], name="mlp")


def cnn() -> Any:
    """The reference classifier (three Conv+Pool blocks, pooling head) written as a Sequential."""
    import keras

    layers: list[Any] = [keras.Input((32, 32, 3), name="image")]
    for width in (8, 16, 32):
        layers += [keras.layers.Conv2D(width, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2)]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    return keras.Sequential(layers, name="cnn")


def _application(arch: str, size: int) -> Callable[[], Any]:
    def build() -> Any:
        import keras

        return getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classes=10)

    build.__doc__ = f"keras.applications.{arch} at {size}x{size}, 10 classes."
    return build


def two_in_two_out() -> Any:
    """Functional model: an image and a feature vector in, class probabilities and a score out."""
    import keras

    image = keras.Input((16, 16, 3), name="image")
    meta = keras.Input((5,), name="meta")
    x = keras.layers.Conv2D(8, 3, activation="relu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m = keras.layers.Dense(8, activation="relu")(meta)
    h = keras.layers.Concatenate()([x, m])
    h = keras.layers.Dense(16, activation="relu")(h)
    probs = keras.layers.Dense(4, activation="softmax", name="probs")(h)
    score = keras.layers.Dense(1, name="score")(h)
    return keras.Model([image, meta], [probs, score], name="two_in_two_out")


def lstm() -> Any:
    """Embedding + LSTM over INT32 token ids of any length (Sequential)."""
    import keras

    return keras.Sequential([
        keras.Input((None,), dtype="int32", name="tokens"),
        keras.layers.Embedding(VOCAB, 16),
        keras.layers.LSTM(16),
        keras.layers.Dense(2, activation="softmax"),
    ], name="lstm")


def gru() -> Any:
    """A GRU over variable-length sequences of 8 features, returning sequences, then pooled."""
    import keras

    inputs = keras.Input((None, 8), name="series")
    x = keras.layers.GRU(12, return_sequences=True)(inputs)
    x = keras.layers.GRU(12)(x)
    outputs = keras.layers.Dense(1, name="forecast")(x)
    return keras.Model(inputs, outputs, name="gru")


def transformer() -> Any:
    """One Transformer encoder block over token ids (fixed length 16), classifier head."""
    import keras

    tokens = keras.Input((16,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, 32)(tokens)
    attn = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)
    x = keras.layers.LayerNormalization()(x + attn)
    ff = keras.layers.Dense(64, activation="relu")(x)
    ff = keras.layers.Dense(32)(ff)
    x = keras.layers.LayerNormalization()(x + ff)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(tokens, outputs, name="transformer")


ZOO: dict[str, Callable[[], Any]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet50": _application("ResNet50", 64),
    "efficientnetb0": _application("EfficientNetB0", 64),
    "mobilenetv3small": _application("MobileNetV3Small", 64),
    "two-in-two-out": two_in_two_out,
    "lstm": lstm,
    "gru": gru,
    "transformer": transformer,
}


def build(name: str, seed: int = 0) -> Any:
    """The zoo model `name`, with weights drawn from `seed`."""
    if name not in ZOO:
        raise ExportError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO)}")
    import keras

    keras.utils.set_random_seed(seed)
    return ZOO[name]()


def save(name: str, out: Path, seed: int = 0) -> Path:
    if out.suffix not in {".keras", ".h5"}:
        raise ExportError(f"--out must end in .keras or .h5, got {out}")
    model = build(name, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out
