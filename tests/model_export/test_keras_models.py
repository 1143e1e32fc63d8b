"""Real Keras models end to end: the reference classifier through the CLI, and two Keras application
architectures no one here wrote (residual connections, batch normalisation), built with weights=None."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from model_export.errors import ExportError
from model_export.export import export_keras
from model_export.graph import GraphIndex
from model_export.manifest import load_manifest
from model_export.proof import Tolerance
from model_export.split import split_model
from model_export.verify import verify_pipeline

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_export", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_reference_model_through_the_command_line(tmp_path: Path) -> None:
    keras_file, onnx_file, out = tmp_path / "ref.keras", tmp_path / "ref.onnx", tmp_path / "ref"
    r = cli("reference", "--out", str(keras_file), "--input-size", "64", "--width", "8")
    assert r.returncode == 0, r.stderr
    r = cli("export", str(keras_file), "--out", str(onnx_file))
    assert r.returncode == 0, r.stderr
    assert "keras vs onnxruntime: 1 tensor(s) over 6 input case(s)" in r.stdout
    model = onnx.load(str(onnx_file))
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["probs"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    r = cli("split", str(onnx_file), "--stages", "4", "--out", str(out), "--runs", "3")
    assert r.returncode == 0, r.stderr
    assert "measuring segments" in r.stderr and "verifying chain" in r.stderr  # progress is shown
    m = load_manifest(out)
    assert len(m.stages) == 4 and m.inputs[0].shape == [-1, 64, 64, 3] and m.outputs[0].shape == [-1, 1000]
    assert cli("verify", str(out)).returncode == 0
    r = cli("inspect", str(out))
    assert r.returncode == 0 and all(s.name in r.stdout for s in m.stages)


def test_export_refuses_what_is_not_a_keras_model(tmp_path: Path) -> None:
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip")
    r = cli("export", str(fake), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "not a .keras archive (a .keras file is a zip archive, this one is not)" in r.stderr
    r = cli("export", str(tmp_path / "model.txt"), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "no such file or directory; expected a Keras model file (.keras" in r.stderr
    torch_file = tmp_path / "model.pt"
    torch_file.write_bytes(b"\0")
    r = cli("export", str(torch_file), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "'.pt' is not a format read here" in r.stderr
    assert "model.save('model.keras')" in r.stderr
    r = cli("export", str(tmp_path), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "a directory without saved_model.pb" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_export_fails_when_onnxruntime_disagrees_with_keras(tmp_path: Path) -> None:
    from model_export.reference import save_reference

    keras_file = save_reference(tmp_path / "r.keras", input_size=16, width=2, classes=10)
    with pytest.raises(ExportError, match="the export differs from Keras; nothing was written: probs"):
        export_keras(keras_file, tmp_path / "r.onnx", tolerance=Tolerance(-1.0, -1.0))
    assert not (tmp_path / "r.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.keras"]


def test_export_of_ops_onnxruntime_lacks_is_one_error(tmp_path: Path) -> None:
    """keras.ops.argmax converts to a TensorFlow Bitcast that tf2onnx leaves as it is: onnxruntime cannot load
    the result, which is said in one line, not a traceback (found by an odd-models trial)."""
    import keras

    x = keras.Input((4,), name="x")
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    keras.Model(x, [probs, keras.ops.argmax(probs, axis=-1)]).save(tmp_path / "argmax.keras")
    r = cli("export", str(tmp_path / "argmax.keras"), "--out", str(tmp_path / "argmax.onnx"))
    assert r.returncode == 2, r.stderr
    assert "error: onnxruntime cannot load the converted model (ops that are not ONNX's: Bitcast)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "argmax.onnx").exists()


def test_a_convolutional_network_of_any_image_size_exports_and_splits(tmp_path: Path) -> None:
    """Input (None, None, 3), two stride-2 poolings: the proof's and the probes' image sizes (32-224 pixels,
    not the 1-12 of a sequence) are ones such a network takes, and its cuts keep their dynamic sizes."""
    import keras

    x = keras.Input((None, None, 3), name="image")
    h = x
    for width in (8, 16):
        h = keras.layers.MaxPooling2D()(keras.layers.Conv2D(width, 3, padding="same", activation="relu")(h))
    y = keras.layers.Dense(3, name="probs")(keras.layers.GlobalAveragePooling2D()(h))
    keras.Model(x, y).save(tmp_path / "fcn.keras")
    result = export_keras(tmp_path / "fcn.keras", tmp_path / "fcn.onnx")
    assert result.proof.cases == 18 and result.proof.max_abs_diff <= 1e-3  # none left out as a size it cannot take
    # Cut inside the convolutions by name: a split by measured cost of a network this small is decided by
    # timing noise, and on a loaded machine both cuts have come after the global pooling.
    inside = GraphIndex.build(onnx.load(tmp_path / "fcn.onnx")).clean_cuts()[:2]
    split = split_model(tmp_path / "fcn.onnx", tmp_path / "fcn", 3, cuts=inside, runs=1)
    assert split.proof.max_abs_diff <= 1e-5
    cut_shapes = [t.shape for s in split.manifest.stages[1:] for t in s.inputs]
    assert all(len(shape) == 4 and shape[0] == -1 and shape[2:] == [-1, -1] for shape in cut_shapes), cut_shapes


def test_a_model_whose_inputs_are_a_dict_exports_with_its_input_names(tmp_path: Path) -> None:
    import keras

    num, cat = keras.Input((8,), name="num"), keras.Input((4,), name="cat")
    joined = keras.layers.Concatenate()([keras.layers.Dense(8)(num), cat])
    keras.Model({"num": num, "cat": cat}, keras.layers.Dense(2, name="score")(joined)).save(tmp_path / "d.keras")
    result = export_keras(tmp_path / "d.keras", tmp_path / "d.onnx")
    assert sorted(result.inputs) == ["cat", "num"] and result.outputs == ["score"]
    assert result.proof.max_abs_diff <= 1e-4


def test_a_lambda_layer_needs_unsafe_and_a_custom_class_is_named(tmp_path: Path) -> None:
    import keras

    x = keras.Input((4,), name="x")
    keras.Model(x, keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)).save(tmp_path / "lambda.keras")
    with pytest.raises(ExportError, match="holds a Lambda layer whose function is Python code.*pass --unsafe"):
        export_keras(tmp_path / "lambda.keras", tmp_path / "lambda.onnx")
    assert export_keras(tmp_path / "lambda.keras", tmp_path / "lambda.onnx", unsafe=True).proof.max_abs_diff == 0

    @keras.saving.register_keras_serializable(package="trial")
    class Scale(keras.layers.Layer):
        def call(self, t):  # type: ignore[no-untyped-def]
            return t * 3.0

    keras.Model(x, Scale(name="scale")(x)).save(tmp_path / "custom.keras")
    keras.saving.get_custom_objects().pop("trial>Scale")  # as in a process that never imported its code
    with pytest.raises(ExportError, match="uses 'Scale', a custom class or function this process cannot "
                                          "import; from the code that defines it, export a SavedModel"):
        export_keras(tmp_path / "custom.keras", tmp_path / "custom.onnx")


# ResNet50 goes through every step in the zoo (test_zoo.py); MobileNetV2's inverted residuals are checked here.
@pytest.mark.parametrize(("arch", "size"), [("MobileNetV2", 96)])
def test_keras_applications_split_at_clean_cuts(arch: str, size: int, tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classes=10)
    model.save(tmp_path / "m.keras")
    export_keras(tmp_path / "m.keras", tmp_path / "m.onnx")
    cuts = assert_no_cut_inside_a_residual_block(onnx.load(str(tmp_path / "m.onnx")))
    result = split_model(tmp_path / "m.onnx", tmp_path / "split", 4, balance="params", runs=1)
    for stage in result.manifest.stages[1:]:
        assert stage.inputs[0].name in cuts and len(stage.inputs) == 1
    assert result.proof.passed and {s.inputs[0].name for s in result.manifest.stages[1:]} <= result.proof.tensors
    assert verify_pipeline(tmp_path / "split") == result.proof.max_abs_diff


def assert_no_cut_inside_a_residual_block(graph: onnx.ModelProto) -> set[str]:
    """Every tensor computed on one branch of a residual Add but not on the other has the other branch
    crossing beside it, so none is a clean cut; returns the clean cuts."""
    index = GraphIndex.build(graph)
    adds = [n for n in graph.graph.node if n.op_type == "Add" and all(i in index.dynamic for i in n.input)]
    assert adds, "expected residual additions in the exported graph"
    cuts = set(index.clean_cuts())
    inside = 0
    for add in adds:
        p, q = add.input
        for branch, other in ((p, q), (q, p)):
            for node in index.ancestors([branch]) - index.ancestors([other]):
                for tensor in graph.graph.node[node].output:
                    assert tensor not in cuts and index.crossing(tensor), tensor
                    inside += 1
    assert inside > len(adds)
    return cuts
