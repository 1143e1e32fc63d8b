"""Dynamic dimensions keep their names through split, and the batch is found where it is, not assumed at
axis 0: time-major tensors (as recurrent layers export) are never offered as cuts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from model_export.__main__ import main
from model_export.dims import value_dims
from model_export.manifest import load_manifest
from model_export.onnx_io import load_onnx
from model_export.split import find_candidates, split_model
from model_export.verify import Chain
from tests.tiny import IR_VERSION, OPSET


@pytest.fixture
def time_major(tmp_path: Path) -> Path:
    """x [batch, sequence, 4] -> t = x as [sequence, batch, 4] -> r = relu(t) -> y back as [batch, sequence, 4]."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0, 2])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION), path)
    return path


def test_time_major_tensors_are_not_cuts(time_major: Path) -> None:
    c = find_candidates(load_onnx(time_major))
    assert c.structural == ["t", "r"] and c.cuts == []
    assert c.values["t"].dims == ["sequence", "batch", 4]


def test_no_usable_cut_is_one_message(time_major: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", str(time_major), "--stages", "2", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no usable cut point" in err and "--stages 1" in err and "Traceback" not in err
    assert main(["split", str(time_major), "--cut", "r", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "--cut 'r': its batch is axis 1" in err and "time-major" in err
    assert not (tmp_path / "p").exists()


def test_dynamic_dims_keep_their_names_in_the_manifest_and_the_stage(time_major: Path, tmp_path: Path) -> None:
    out = tmp_path / "whole"
    split_model(time_major, out, 1, runs=1)
    m = load_manifest(out)
    assert m.inputs[0].shape == [-1, -1, 4] and m.inputs[0].dim_names == ["batch", "sequence", None]
    assert m.outputs[0].dim_names == ["batch", "sequence", None]
    stage = onnx.load(str(out / "stage-0.onnx"))
    assert value_dims(stage.graph.input[0], "x") == ["batch", "sequence", 4]
    assert value_dims(stage.graph.output[0], "y") == ["batch", "sequence", 4]
    x = np.random.default_rng(0).standard_normal((4, 12, 4)).astype(np.float32)
    np.testing.assert_array_equal(Chain(out, m).run({"x": x})["y"], np.maximum(x, 0))


def test_a_dimension_that_mixes_batch_and_another_is_no_cut(tmp_path: Path) -> None:
    """A [batch * 2, 4] reshape has no batch axis of its own: a stage could not be batched on it."""
    flat = onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "flat")
    wide = onnx.numpy_helper.from_array(np.array([-1, 8], np.int64), "wide")
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]), helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Reshape", ["r", "wide"], ["w"]), helper.make_node("Relu", ["w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializer=[flat, wide])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION), path)
    c = find_candidates(load_onnx(path))
    assert c.values["f"].dims == ["?", 4] and c.values["w"].dims == ["batch", 8]
    assert c.structural == ["f", "r", "w"] and c.cuts == ["w"]


def test_cuts_lists_dims_and_says_what_it_left_out(time_major: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cuts", str(time_major)]) == 0
    out = capsys.readouterr().out
    assert "0 clean cut points" in out and "2 more single-tensor cut(s) not offered" in out


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], x: list[int | str], y: list[int | str],
          inits: list[onnx.TensorProto]) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], initializer=inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION), path)
    return path


def test_a_size_changed_by_a_valid_convolution_or_a_pooling_is_still_a_cut(tmp_path: Path) -> None:
    """height - 2 and (height - 2) / 2 follow no input dimension alone, but keep their size when only the batch
    changes: a stage can be batched on such a tensor (found by an odd-models trial: they were not offered)."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(2).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    path = _save(tmp_path, nodes, ["batch", 3, "height", "width"], ["batch", 8], [w])
    c = find_candidates(load_onnx(path))
    assert {n: c.values[n].dims for n in ("c", "r", "p")} == dict.fromkeys(("c", "r", "p"), ["batch", 8, "*", "*"])
    assert c.cuts == ["c", "r", "p", "g"]
    out = tmp_path / "split"
    result = split_model(path, out, None, cuts=["r", "p"], runs=1)
    assert result.proof.max_abs_diff == 0.0
    stage = load_manifest(out).stages[1]
    assert [(t.name, t.shape) for t in stage.inputs] == [("r", [-1, 8, -1, -1])]


def test_a_dimension_that_changes_with_the_batch_is_no_cut_and_says_so(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """e = x flattened and repeated batch times: [batch, batch * 4], axis 0 the batch, axis 1 growing with it."""
    row = onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "row")
    first = onnx.numpy_helper.from_array(np.array([0], np.int64), "first")
    one = onnx.numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [helper.make_node("Reshape", ["x", "row"], ["t"]), helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "first", "one"], ["b"]),
             helper.make_node("Concat", ["b", "one"], ["target"], axis=0),
             helper.make_node("Expand", ["t", "target"], ["e"]), helper.make_node("Relu", ["e"], ["r"]),
             helper.make_node("ReduceSum", ["r", "one"], ["y"], keepdims=1)]
    path = _save(tmp_path, nodes, ["batch", 4], ["batch", 1], [row, first, one])
    c = find_candidates(load_onnx(path))
    assert c.values["r"].dims == ["batch", "?"] and "r" not in c.cuts
    message = " ".join((capsys.readouterr(), main(["split", str(path), "--cut", "r", "--out",
                                                   str(tmp_path / "s")]), capsys.readouterr().err)[2].split())
    assert "a dynamic dimension of it changes with the batch (dims ['batch', '?']" in message, message


def test_an_axis_both_probes_bring_to_one_size_is_still_dynamic(tmp_path: Path) -> None:
    """A stride of 2 takes a sequence of 5 and of 6 both to 3: the measuring run, at 16, tells it is dynamic."""
    w = onnx.numpy_helper.from_array(np.ones((4, 4, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[2], keepdims=0)]
    path = _save(tmp_path, nodes, ["batch", 4, "sequence"], ["batch", 4], [w])
    c = find_candidates(load_onnx(path))
    assert c.values["c"].dims == ["batch", 4, "*"] and "c" in c.cuts
    assert split_model(path, tmp_path / "s", None, cuts=["r"], runs=1).proof.max_abs_diff == 0.0


def test_a_one_step_model_says_there_is_nothing_between_to_cut(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], ["batch", 4], ["batch", 4], [])
    assert main(["split", str(path), "--stages", "2", "--out", str(tmp_path / "s")]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "no tensor lies between the inputs and the outputs (the model is one step)" in message
