"""`split`, `verify`, `inspect`, `merge` on a hand-built chain, and every bad input the issue names."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_export.__main__ import main
from model_export.errors import ExportError
from model_export.manifest import load_manifest, sha256_file
from model_export.proof import Tolerance
from model_export.split import split_model
from tests.model_export import graphs
from tests.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole model of a 4-layer dense chain (16 -> 32 -> 24 -> 12 -> 4)."""
    directory = tmp_path_factory.mktemp("whole")
    write_tiny_pipeline(directory, widths=(16, 32, 24, 12, 4))
    return directory / "model.onnx"


def test_split_writes_a_manifest_that_describes_the_stages(whole: Path, tmp_path: Path) -> None:
    out = tmp_path / "chain"
    result = split_model(whole, out, 3, runs=3)
    m = load_manifest(out)
    assert m.name == "chain" and len(m.stages) == 3
    assert [s.name for s in m.stages] == ["chain-stage-0", "chain-stage-1", "chain-stage-2"]
    assert m.inputs[0].name == "x" and m.inputs[0].shape == [-1, 16] and m.inputs[0].datatype == "FP32"
    assert m.outputs[0].name == "y" and m.outputs[0].shape == [-1, 4]
    assert m.source_model.sha256 == sha256_file(whole)
    assert (out / m.source_model.file).resolve() == whole.resolve()
    for s in m.stages:
        assert sha256_file(out / s.file) == s.sha256
        weights = onnx.load(out / s.file).graph.initializer
        assert s.cost.latency_ms > 0 and s.cost.param_bytes == sum(numpy_helper.to_array(w).nbytes for w in weights)
        assert s.cost.bytes_out == sum(4 * t.shape[1] for t in s.outputs)
    # the stages share the whole model's weights between them, whichever cuts the (microsecond, noisy) timing chose
    layers = [(16, 32), (32, 24), (24, 12), (12, 4)]
    assert sum(s.cost.param_bytes for s in m.stages) == 4 * sum((a + 1) * b for a, b in layers)
    assert result.proof.passed and result.proof.max_abs_diff <= 1e-5
    assert len(result.segment_costs) == 12  # 11 clean cuts in a 4-layer MatMul/Add/Relu chain
    # the chain equals the whole model on a fresh input
    x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    h = {"x": x}
    for s in m.stages:
        sess = ort.InferenceSession(str(out / s.file))
        h = dict(zip([o.name for o in s.outputs], sess.run(None, h), strict=True))
    expected = ort.InferenceSession(str(whole)).run(None, {"x": x})[0]
    np.testing.assert_allclose(h["y"], expected, atol=1e-5)


def test_split_writes_a_directory_others_can_read(whole: Path, tmp_path: Path) -> None:
    """A stage container runs as UID 10001 and reads the pipeline mounted into it: directories 0755 and files
    0644 whatever the umask of the user who split (mkdtemp alone leaves the directory 0700)."""
    out = tmp_path / "shared"
    previous = os.umask(0o077)
    try:
        split_model(whole, out, 2, runs=1)
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "pipeline.json": 0o644, "stage-0.onnx": 0o644, "stage-1.onnx": 0o644}


def test_balance_by_parameters_minimises_the_largest_stage(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path, widths=(4, 4, 256, 4, 4))
    out = tmp_path / "params"
    split_model(tmp_path / "model.onnx", out, 3, balance="params", runs=1)
    m = load_manifest(out)
    assert m.profile.balance == "params"
    params = [s.cost.param_bytes for s in m.stages]
    # the best bottleneck splits layer 1's weight (4x256) from its bias, leaving layers 2+3 the heaviest
    assert max(params) == 4 * ((256 * 4 + 4) + (4 * 4 + 4))
    assert sum(params) == 4 * ((4 * 4 + 4) + (4 * 256 + 256) + (256 * 4 + 4) + (4 * 4 + 4))


def test_user_given_cuts_are_used(whole: Path, tmp_path: Path) -> None:
    out = tmp_path / "given"
    split_model(whole, out, None, cuts=["h2", "h1"], runs=1)
    m = load_manifest(out)
    assert [s.outputs[0].name for s in m.stages] == ["h1", "h2", "y"]


def test_cli_split_verify_inspect_merge(whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["split", str(whole), "--stages", "2", "--out", str(out), "--runs", "2"]) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert main(["inspect", str(out), "--plot", str(tmp_path / "costs.png")]) == 0
    text = capsys.readouterr().out
    assert "cli-stage-0" in text and "cli-stage-1" in text and "latency ms" in text
    assert (tmp_path / "costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["merge", str(out), "--out", str(tmp_path / "merged.onnx")]) == 0
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    merged = ort.InferenceSession(str(tmp_path / "merged.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(merged, ort.InferenceSession(str(whole)).run(None, {"x": x})[0], atol=1e-5)


def test_what_a_megabyte_costs_is_a_setting_checked_before_any_work(whole: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("-1", "nan", "inf"):
        msg = _error(capsys, ["split", str(whole), "--stages", "2", "--out", str(tmp_path / "p"),
                              "--transfer-ms-per-mb", bad])
        assert "--transfer-ms-per-mb must be a number of milliseconds, 0 or more" in msg and bad in msg
    assert not (tmp_path / "p").exists()
    assert main(["split", str(whole), "--stages", "2", "--out", str(tmp_path / "p"), "--runs", "1",
                 "--transfer-ms-per-mb", "2.5"]) == 0
    assert "balanced counting 2.50 ms per MB a stage receives or sends" in capsys.readouterr().out
    assert split_model(whole, tmp_path / "q", 2, runs=1).per_mb_ms == 0.7  # the default
    assert split_model(whole, tmp_path / "r", 2, runs=1, balance="params").per_mb_ms is None


def test_verify_catches_a_stage_that_no_longer_fits(whole: Path, tmp_path: Path) -> None:
    out = tmp_path / "tampered"
    split_model(whole, out, 2, runs=1)
    manifest = json.loads((out / "pipeline.json").read_text())
    # swap in another stage-0 with other weights, and update the sha so only the numbers can tell
    other = tmp_path / "other"
    write_tiny_pipeline(other, widths=(16, 32, 24, 12, 4), seed=99)
    cut = manifest["stages"][0]["outputs"][0]["name"]
    split_model(other / "model.onnx", tmp_path / "other-split", None, cuts=[cut], runs=1)
    (out / "stage-0.onnx").write_bytes((tmp_path / "other-split" / "stage-0.onnx").read_bytes())
    manifest["stages"][0]["sha256"] = sha256_file(out / "stage-0.onnx")
    (out / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="differ from the whole model"):
        from model_export.verify import verify_pipeline

        verify_pipeline(out)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line however long: a log or a pipe gets it unbroken
    return err.strip()


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_bad_inputs_get_one_clear_message_and_leave_nothing(whole: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    out = tmp_path / "out"
    assert "not a readable ONNX model" in _error(capsys, ["split", str(text), "--stages", "2", "--out", str(out)])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    assert "not a readable ONNX model" in _error(capsys, ["split", str(corrupt), "--stages", "2", "--out", str(out)])
    assert "no such file" in _error(capsys, ["split", str(tmp_path / "missing.onnx"), "--stages", "2", "--out",
                                             str(out)])
    msg = _error(capsys, ["split", str(whole), "--cut", "nope", "--out", str(out)])
    assert "--cut 'nope': no such tensor" in msg and "clean cut points include" in msg
    msg = _error(capsys, ["split", str(whole), "--cut", "x", "--out", str(out)])
    assert "--cut 'x': is an input of the model, not a tensor between its inputs and outputs" in msg
    msg = _error(capsys, ["split", str(whole), "--stages", "40", "--out", str(out)])
    assert "only 11 clean cut points, so at most 12 stages" in msg
    existing = tmp_path / "exists"
    existing.mkdir()
    assert "already exists" in _error(capsys, ["split", str(whole), "--stages", "2", "--out", str(existing)])
    assert "needs 2 --cut" in _error(capsys, ["split", str(whole), "--stages", "3", "--cut", "h1", "--out", str(out)])
    bad_name = str(tmp_path / "Bad_Name")
    assert "is not a DNS label (lowercase letters" in _error(capsys, ["split", str(whole), "--stages", "2", "--out",
                                                                  bad_name])
    assert not out.exists() and not (tmp_path / "Bad_Name").exists()
    _no_leftovers(tmp_path)


def test_a_cut_through_a_residual_branch_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    path = tmp_path / "residual.onnx"
    onnx.save(graphs.residual(), path)
    msg = _error(capsys, ["split", str(path), "--cut", "b", "--out", str(tmp_path / "res")])
    assert "--cut 'b' is not a clean cut: ['a'] would also cross it" in msg
    assert not (tmp_path / "res").exists()
    _no_leftovers(tmp_path)


def test_a_failed_check_leaves_no_directory(whole: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match="differ from the whole model"):
        split_model(whole, out, 2, runs=1, tolerance=Tolerance(-1.0, -1.0))  # nothing can pass a negative tolerance
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_verify_and_inspect_refuse_a_directory_without_a_manifest(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert "no manifest here" in _error(capsys, ["verify", str(tmp_path)])
    (tmp_path / "pipeline.json").write_text("{not json")
    assert "not a readable JSON manifest" in _error(capsys, ["inspect", str(tmp_path)])


def test_verify_against_another_model_and_a_plot_it_cannot_write_are_one_error(
        whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pair"
    split_model(whole, out, None, cuts=["h3"], runs=1)  # a cut of its own: one timed choice may be any of them
    other = tmp_path / "other"
    write_tiny_pipeline(other, widths=(16, 8, 4), seed=5)  # two layers: no h3
    message = _error(capsys, ["verify", str(out), "--model", str(other / "model.onnx")])
    assert message.startswith(f"error: {other / 'model.onnx'} does not have the pipeline's cut tensors and outputs")
    assert message.endswith("and this file's sha256 differs")
    assert "--plot" in _error(capsys, ["inspect", str(out), "--plot", str(tmp_path / "p.txt")])
    assert "cannot write it" in _error(capsys, ["inspect", str(out), "--plot", str(tmp_path / "no" / "p.png")])


def test_one_stage_is_the_whole_model_as_one_servable_stage(whole: Path, tmp_path: Path) -> None:
    result = split_model(whole, tmp_path / "one", 1, runs=1)
    m = result.manifest
    assert len(m.stages) == 1 and result.segment_costs == []
    assert m.stages[0].inputs == m.inputs and m.stages[0].outputs == m.outputs
    assert result.proof.max_abs_diff == 0.0
