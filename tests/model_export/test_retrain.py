"""`retrain-stage` on a tiny reference classifier: the head alone is trained on the generated data, its loss
falls and its outputs change, every other stage stays byte-identical, and check-contract accepts the new
pipeline; a stage without weights, bad data and a model whose cut tensors moved are one message each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_export.contract import check_contract
from model_export.errors import ExportError
from model_export.keras_source import load_keras
from model_export.manifest import Manifest, load_manifest, sha256_file
from model_export.ort_session import create_session
from model_export.reference import save_reference
from model_export.retrain import RetrainResult, TrainingOptions, retrain_stage, stage_holding
from model_export.split import split_model
from model_export.training_data import write_reference_data
from model_export.verify import prove_pipeline

TINY = {"input_size": 16, "width": 4, "classes": 10, "hidden_layers": 1, "hidden_width": 16}
CUTS = ["reference_1/block2_pool_1/MaxPool2d:0", "reference_1/hidden1_1/Relu:0"]
HEAD = "tiny-stage-2"
OPTIONS = TrainingOptions(epochs=3, learning_rate=0.05, batch_size=32, seed=0)


def export(keras_path: Path, onnx_path: Path) -> None:
    """As a user does, in its own process: retrain-stage exports the same way (see model_export.retrain)."""
    subprocess.run([sys.executable, "-m", "model_export", "export", str(keras_path), "--out", str(onnx_path)],
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("retrain")
    save_reference(root / "model.keras", **TINY)
    export(root / "model.keras", root / "model.onnx")
    split_model(root / "model.onnx", root / "tiny", stages=3, cuts=CUTS, runs=1)
    write_reference_data(load_keras(root / "model.keras"), root / "data.npz", samples=256, seed=0)
    return root


@pytest.fixture(scope="module")
def retrained(tiny: Path) -> RetrainResult:
    return retrain_stage(tiny / "tiny", HEAD, tiny / "model.keras", tiny / "data.npz", tiny / "tiny-v2", OPTIONS)


def head_outputs(directory: Path, manifest: Manifest, features: np.ndarray) -> np.ndarray:
    stage = manifest.stage(HEAD)
    session = create_session((directory / stage.file).read_bytes())
    return np.asarray(session.run(None, {stage.inputs[0].name: features})[0])


def test_the_head_learns_and_only_it_changes(tiny: Path, retrained: RetrainResult) -> None:
    assert retrained.layers == ["probs"]
    assert retrained.loss_after < retrained.loss_before
    assert len(retrained.epoch_losses) == OPTIONS.epochs
    old, new = load_manifest(tiny / "tiny"), load_manifest(tiny / "tiny-v2")
    assert [s.version for s in new.stages] == ["v1", "v1", "v2"]
    assert new.stage(HEAD).file == "stage-2-v2.onnx"
    for was, now in zip(old.stages[:2], new.stages[:2], strict=True):
        assert sha256_file(tiny / "tiny-v2" / now.file) == was.sha256 == now.sha256
    assert sha256_file(tiny / "tiny-v2" / new.stage(HEAD).file) != old.stage(HEAD).sha256
    features = np.random.default_rng(1).uniform(0, 1, (4, 16)).astype(np.float32)
    before, after = head_outputs(tiny / "tiny", old, features), head_outputs(tiny / "tiny-v2", new, features)
    assert before.shape == after.shape == (4, 10)
    assert np.abs(before - after).max() > 1e-3


def test_check_contract_accepts_it_and_the_chain_is_the_new_model(tiny: Path, retrained: RetrainResult) -> None:
    report = check_contract(tiny / "tiny", tiny / "tiny-v2")
    assert report.fits and report.changed == [HEAD]
    assert prove_pipeline(tiny / "tiny-v2").cases > 0
    assert (tiny / "tiny-v2" / "model.keras").is_file()


def test_a_stage_is_found_by_the_layer_it_holds(tiny: Path) -> None:
    """--layer: the head is where the split put the head's Dense, whatever its index."""
    manifest, model = load_manifest(tiny / "tiny"), load_keras(tiny / "model.keras")
    assert stage_holding(tiny / "tiny", manifest, model, "probs")[0] == HEAD
    assert stage_holding(tiny / "tiny", manifest, model, "block1_conv")[0] == "tiny-stage-0"
    with pytest.raises(ExportError, match=r"--layer 'pool': the model has no layer of that name with trainable "
                                          r"weights; its layers with weights are \['block1_conv'"):
        stage_holding(tiny / "tiny", manifest, model, "pool")
    with pytest.raises(ExportError, match="give --stage NAME or --layer NAME"):
        retrain_stage(tiny / "tiny", HEAD, tiny / "model.keras", tiny / "data.npz", tiny / "w", OPTIONS, layer="probs")


def test_a_stage_without_weights_is_one_message(tiny: Path) -> None:
    pooling = ["reference_1/block3_pool_1/MaxPool2d:0", "reference_1/pool_1/Mean_Squeeze__31:0"]
    split_model(tiny / "model.onnx", tiny / "pooled", stages=3, cuts=pooling, runs=1)
    with pytest.raises(ExportError, match="pooled-stage-1 holds no Keras layer with trainable weights"):
        retrain_stage(tiny / "pooled", "pooled-stage-1", tiny / "model.keras", tiny / "data.npz", tiny / "x", OPTIONS)


def test_data_of_the_wrong_shape_is_one_message(tiny: Path) -> None:
    np.savez(tiny / "bad.npz", image=np.zeros((3, 8, 8, 3), np.float32), labels=np.zeros(3, np.int64))
    result = subprocess.run([sys.executable, "-m", "model_export", "retrain-stage", str(tiny / "tiny"), "--stage", HEAD,
                             "--model", str(tiny / "model.keras"), "--data", str(tiny / "bad.npz"), "--out",
                             str(tiny / "y")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "'image' has shape [3, 8, 8, 3], expected ['N', 16, 16, 3]" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tiny / "y").exists()


def test_moved_cut_tensors_are_one_message(tiny: Path, retrained: RetrainResult) -> None:
    # the same layers but no hidden1: the old cut at hidden1's Relu no longer exists
    save_reference(tiny / "other.keras", **{**TINY, "hidden_layers": 0})
    with pytest.raises(ExportError, match="the cut tensors moved"):
        retrain_stage(tiny / "tiny", HEAD, tiny / "other.keras", tiny / "data.npz", tiny / "z", OPTIONS)
    assert not (tiny / "z").exists()
