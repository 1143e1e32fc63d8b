"""`check-contract` on tiny pipelines: a retrained stage fits; a changed tensor name, datatype, width or
stage list does not, and exits 2 with the reason; every changed stage is reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from model_export.contract import check_contract, shape_accepts
from model_export.errors import ExportError
from model_export.manifest import load_manifest, sha256_file
from model_export.stage_version import write_stage_version
from tests.tiny import IR_VERSION, OPSET, dense_stage_graph, write_tiny_pipeline

WIDTHS = (16, 32, 24, 4)


@pytest.fixture
def old(tmp_path: Path) -> Path:
    write_tiny_pipeline(tmp_path / "old", widths=WIDTHS)
    return tmp_path / "old"


def retrained_last(seed: int = 99, width_out: int = WIDTHS[-1], out_name: str = "y") -> onnx.ModelProto:
    """The last stage with other weights (a new seed), optionally another width or output name."""
    return dense_stage_graph(2, "h2", out_name, WIDTHS[2], width_out, seed)


def check(old: Path, new: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_export", "check-contract", str(old), str(new)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})


def test_a_new_version_of_one_stage_fits_and_only_it_is_reported(old: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    manifest = write_stage_version(old, new, "tiny-stage-2", retrained_last())
    assert manifest.stages[2].version == "v2" and manifest.stages[2].file == "stage-2-v2.onnx"
    for i in (0, 1):
        assert sha256_file(new / f"stage-{i}.onnx") == sha256_file(old / f"stage-{i}.onnx")
    report = check_contract(old, new)
    assert report.fits and report.changed == ["tiny-stage-2"]
    result = check(old, new)
    assert result.returncode == 0, result.stderr
    assert "changed stages: tiny-stage-2" in result.stdout
    assert max(map(len, result.stdout.splitlines())) <= 80


def test_the_same_pipeline_fits_with_nothing_changed(old: Path, tmp_path: Path) -> None:
    shutil.copytree(old, tmp_path / "copy")
    report = check_contract(old, tmp_path / "copy")
    assert report.fits and report.changed == []


def test_another_width_does_not_fit_and_names_the_tensor(old: Path, tmp_path: Path) -> None:
    write_stage_version(old, tmp_path / "new", "tiny-stage-2", retrained_last(width_out=5))
    result = check(old, tmp_path / "new")
    assert result.returncode == 2
    assert "tensor 'y'" in result.stderr and "[-1, 5]" in result.stderr and "[-1, 4]" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_renamed_output_does_not_fit(old: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not fit its neighbours"):
        write_stage_version(old, tmp_path / "new", "tiny-stage-2", retrained_last(out_name="logits"))
    # written by hand, past the writer's check, check-contract still refuses it
    shutil.copytree(old, tmp_path / "hand")
    manifest = load_manifest(tmp_path / "hand")
    manifest.stages[2].outputs[0].name = "logits"
    manifest.outputs[0].name = "logits"
    (tmp_path / "hand" / "pipeline.json").write_text(manifest.model_dump_json())
    report = check_contract(old, tmp_path / "hand")
    assert not report.fits
    assert any("old pipeline's clients expects tensors ['y']" in r for r in report.reasons())


def test_another_datatype_does_not_fit(old: Path, tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("h2", TensorProto.DOUBLE, ["batch", WIDTHS[2]])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", WIDTHS[3]])
    graph = helper.make_graph([helper.make_node("Slice", ["h2", "s", "e", "a"], ["y"])], "f64", [x], [y], initializer=[
        helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", WIDTHS[3]), ("a", 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    write_stage_version(old, tmp_path / "new", "tiny-stage-2", model)
    report = check_contract(old, tmp_path / "new")
    assert not report.fits
    assert "old tiny-stage-1 v1 sends FP32, new tiny-stage-2 v2 expects FP64" in "; ".join(report.reasons())


def test_a_changed_stage_elsewhere_is_reported(old: Path, tmp_path: Path) -> None:
    write_stage_version(old, tmp_path / "mid", "tiny-stage-2", retrained_last())
    write_stage_version(tmp_path / "mid", tmp_path / "new", "tiny-stage-0", dense_stage_graph(0, "x", "h1", 16, 32, 7))
    result = check(old, tmp_path / "new")
    assert result.returncode == 0
    assert "changed stages: tiny-stage-0, tiny-stage-2" in result.stdout
    data = json.loads(check_json(old, tmp_path / "new"))
    assert data["changed"] == ["tiny-stage-0", "tiny-stage-2"] and data["fits"] is True


def check_json(old: Path, new: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "model_export", "check-contract", str(old), str(new), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_another_split_does_not_fit(old: Path, tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "two", widths=(16, 32, 4))
    result = check(old, tmp_path / "two")
    assert result.returncode == 2 and "the stages differ" in result.stderr


def test_a_tampered_stage_file_is_one_error(old: Path, tmp_path: Path) -> None:
    shutil.copytree(old, tmp_path / "bad")
    (tmp_path / "bad" / "stage-1.onnx").write_bytes(b"not onnx")
    result = check(old, tmp_path / "bad")
    assert result.returncode == 2 and "sha256" in result.stderr and "Traceback" not in result.stderr


def test_a_fixed_receiver_takes_only_that_size() -> None:
    assert shape_accepts([-1, 4], [-1, 4]) and shape_accepts([-1, -1], [1, 4])
    assert not shape_accepts([1, 4], [-1, 4]) and not shape_accepts([-1, 4], [-1, 4, 1])
