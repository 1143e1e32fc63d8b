"""Clean cuts on hand-built graphs: chains, residual blocks, control flow, shared constants."""

from __future__ import annotations

import numpy as np
import onnx

from model_export.graph import GraphIndex, extract
from model_export.profile import activations
from tests.model_export import graphs
from tests.tiny import write_tiny_pipeline


def test_every_tensor_of_a_chain_is_a_clean_cut(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_tiny_pipeline(tmp_path, widths=(6, 5, 4))
    index = GraphIndex.build(onnx.load(tmp_path / "model.onnx"))
    assert index.clean_cuts() == ["mm0", "add0", "h1", "mm1", "add1"]


def test_no_cut_inside_a_residual_block() -> None:
    index = GraphIndex.build(graphs.residual())
    cuts = index.clean_cuts()
    assert cuts == ["a0", "a", "r", "y0"]
    assert index.crossing("b") == {"a"}  # the skip path crosses there
    assert index.crossing("b0") == {"a"}


def test_no_cut_separates_a_control_flow_node_from_what_its_branches_read() -> None:
    index = GraphIndex.build(graphs.with_control_flow())
    assert "h" not in index.clean_cuts()
    assert "branch" in index.clean_cuts()
    assert "x" in index.crossing("h")


def test_constants_are_copied_into_both_stages() -> None:
    model = graphs.with_shared_constant()
    index = GraphIndex.build(model)
    assert index.clean_cuts() == ["h", "h2"]
    values = activations(model, ["h2", "y"])
    infos = {n: a.value_info() for n, a in values.items()}
    first = extract(index, ["x"], ["h2"], infos, "s0")
    second = extract(index, ["h2"], ["y"], infos, "s1")
    for stage in (first, second):
        onnx.checker.check_model(stage, full_check=True)
        assert any(n.op_type == "Constant" for n in stage.graph.node)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    h2 = ort.InferenceSession(first.SerializeToString()).run(None, {"x": x})[0]
    y = ort.InferenceSession(second.SerializeToString()).run(None, {"h2": h2})[0]
    np.testing.assert_allclose(y, np.maximum(x * 0.5, 0) * 0.5, atol=1e-6)
