"""The proof can fail: relative + absolute tolerance, every cut tensor compared, constant outputs reported,
inputs in their realistic ranges or the user's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from model_export.__main__ import main
from model_export.dims import InputSpec
from model_export.errors import ExportError
from model_export.manifest import load_manifest, sha256_file, write_manifest
from model_export.proof import Proof, Tolerance
from model_export.samples import load_samples, proof_cases, vocabularies
from model_export.split import split_model
from model_export.verify import prove_pipeline
from tests.tiny import IR_VERSION, OPSET


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _io(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])


def test_tolerance_is_relative_plus_absolute() -> None:
    proof = Proof(Tolerance(rtol=1e-3, atol=1e-6))
    proof.compare("logits", np.array([[1000.0]]), np.array([[1000.5]]), "big values")  # within 0.1 %
    assert proof.passed
    proof.compare("probs", np.array([[1e-3]]), np.array([[1.2e-3]]), "small values")  # 20 % off
    assert not proof.passed and proof.worst == "probs (small values)"
    with pytest.raises(ExportError, match=r"probs \(small values\) is off by up to"):
        proof.check("chain")


def test_shape_and_nan_mismatches_fail_at_once() -> None:
    proof = Proof(Tolerance(0.1, 0.1))
    with pytest.raises(ExportError, match=r"shape \[1, 3\] differs from the expected \[1, 2\]"):
        proof.compare("y", np.zeros((1, 2)), np.zeros((1, 3)), "case")
    with pytest.raises(ExportError, match="non-finite"):
        proof.compare("y", np.zeros((1, 2)), np.array([[0.0, np.nan]]), "case")


def test_a_case_the_model_cannot_run_is_named_in_whole_words() -> None:
    proof = Proof(Tolerance(0.1, 0.1))
    proof.cases = 2
    reason = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " + "x" * 249 + " idx=999"  # cut at 300: "...idx=99"
    proof.skip("batch 1", reason)
    assert proof.skipped[0].endswith(" ...") and "idx=99" not in proof.skipped[0]
    with pytest.raises(ExportError, match="runs on none of the 2 input cases"):
        proof.skip("batch 4", "[ONNXRuntimeError] : idx=999 out of bounds")
    assert proof.skipped[1] == "batch 4: [ONNXRuntimeError] : idx=999 out of bounds"


def test_constant_outputs_are_reported() -> None:
    proof = Proof(Tolerance(1e-4, 1e-5))
    for rows in (np.full((4, 10), 0.1), np.full((1, 10), 0.1)):
        proof.observe_output("probs", rows)
    proof.observe_output("score", np.arange(4.0).reshape(4, 1))
    assert proof.degenerate == ["probs"]
    assert "output(s) ['probs'] are the same for every input" in proof.summary()


@pytest.fixture
def relu_of_negative(tmp_path: Path) -> Path:
    """h = -relu(x W); y = relu(h): y is 0 for every input, so only the cut tensor h can tell stages apart."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Neg", ["r"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    path = tmp_path / "model.onnx"
    onnx.save(_model(nodes, [_io("x", 4)], [_io("y", 4)], [w]), path)
    return path


def test_a_wrong_cut_tensor_fails_the_proof_even_when_outputs_agree(relu_of_negative: Path, tmp_path: Path) -> None:
    out = tmp_path / "neg"
    result = split_model(relu_of_negative, out, cuts=["h"], stages=None, runs=1)
    assert result.proof.degenerate == ["y"] and result.proof.tensors == {"h", "y"}
    # stage 0 replaced by one computing -|x W| instead of -relu(x W): y is still 0 everywhere
    stage0 = onnx.load(str(out / "stage-0.onnx"))
    for node in stage0.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Abs"
    onnx.save(stage0, str(out / "stage-0.onnx"))
    manifest = load_manifest(out)
    manifest.stages[0].sha256 = sha256_file(out / "stage-0.onnx")
    write_manifest(manifest, out)
    with pytest.raises(ExportError, match=r"the chained stages differ from the whole model: h \(batch"):
        prove_pipeline(out)


def test_vocabulary_of_an_embedding_bounds_the_token_ids() -> None:
    table = onnx.numpy_helper.from_array(np.zeros((37, 3), np.float32), "table")
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "ids64"], ["emb"])]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "sequence"])
    out = helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "sequence", 3])
    model = _model(nodes, [ids], [out], [table])
    assert vocabularies(model) == {"ids": 37}
    cases = proof_cases([InputSpec("ids", ["batch", "sequence"], np.dtype("int32"))], {"ids": 37})
    lengths = sorted({c.feeds["ids"].shape for c in cases})
    assert lengths == [(1, 1), (1, 5), (1, 12), (4, 1), (4, 5), (4, 12)]
    every_id = np.concatenate([c.feeds["ids"].ravel() for c in cases])
    assert every_id.max() == 36 and every_id.min() == 0


def test_float_inputs_are_tried_as_images_in_both_ranges() -> None:
    cases = proof_cases([InputSpec("image", ["batch", 8, 8, 3], np.dtype("float32"))], {})
    labels = [c.label for c in cases]
    assert "batch 4, floats 0-255" in labels and "batch 1, floats 0-1" in labels
    big = next(c for c in cases if c.label == "batch 4, floats 0-255").feeds["image"]
    assert big.max() > 200 and big.dtype == np.float32


def test_samples_from_the_user(relu_of_negative: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = [InputSpec("x", ["batch", 4], np.dtype("float32"))]
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((3, 4), np.float64))
    (case,) = load_samples(good, spec)
    assert case.feeds["x"].dtype == np.float32 and case.feeds["x"].shape == (3, 4)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.ones((3, 4), np.float32))
    with pytest.raises(ExportError, match=r"holds arrays \['image'\]; expected one per model input: \['x'\]"):
        load_samples(wrong, spec)
    np.savez(wrong, x=np.ones((3, 5), np.float32))
    with pytest.raises(ExportError, match=r"x has shape \[3, 5\]; expected \['batch', 4\]"):
        load_samples(wrong, spec)
    pair = [*spec, InputSpec("z", ["batch", 2], np.dtype("float32"))]
    np.savez(wrong, x=np.ones((3, 4), np.float32), z=np.ones((2, 2), np.float32))
    with pytest.raises(ExportError, match=r"different numbers of samples \{'x': 3, 'z': 2\}; expected the same"):
        load_samples(wrong, pair)
    out = tmp_path / "pipe"
    assert main(["split", str(relu_of_negative), "--cut", "h", "--out", str(out), "--runs", "1",
                 "--samples", str(good)]) == 0
    assert "over 1 input case(s)" in capsys.readouterr().out
    assert main(["verify", str(out), "--samples", str(tmp_path / "missing.npz")]) == 2
    assert "not a readable .npz file" in capsys.readouterr().err


def test_cases_the_model_itself_does_not_take_are_left_out(tmp_path: Path) -> None:
    """A 3-wide convolution without padding takes no sequence shorter than 3: length 1 proves nothing."""
    w = onnx.numpy_helper.from_array(np.ones((1, 1, 3), np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "sequence"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "steps"])
    path = tmp_path / "conv.onnx"
    onnx.save(_model([helper.make_node("Conv", ["x", "W"], ["y"])], [x], [y], [w]), path)
    result = split_model(path, tmp_path / "conv", 1, runs=1)
    assert len(result.proof.skipped) == 6 and all("sequence 1," in s for s in result.proof.skipped)
    assert "6 case(s) the model itself does not take were left out" in result.proof.summary()
    assert result.manifest.outputs[0].dim_names == ["batch", None, "y_dim2"]
