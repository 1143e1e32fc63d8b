"""The memory benchmark's large variant, written directly as ONNX: a small instance of the same layers passes
ONNX's checker, runs in onnxruntime and answers a probability per class; the command writes the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from benchmarks.large_model import large_model, main
from model_export.ort_session import create_session


def test_the_same_layers_run_and_answer_probabilities(tmp_path: Path) -> None:
    model = large_model(hidden_layers=3, hidden_width=32, classes=5, size=16)
    onnx.checker.check_model(model)
    session = create_session(model.SerializeToString(), 1)
    probs = session.run(None, {"image": np.random.default_rng(0).random((2, 16, 16, 3), np.float32)})[0]
    assert probs.shape == (2, 5) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = [t.name for t in model.graph.initializer]
    assert [n for n in names if n.startswith("hidden") and n.endswith("_w")] == ["hidden1_w", "hidden2_w", "hidden3_w"]


def test_the_command_writes_the_file_and_refuses_a_wrong_name(tmp_path: Path, capsys: object) -> None:
    assert main(["--out", str(tmp_path / "m.txt")]) == 2
    assert main(["--out", str(tmp_path / "m.onnx"), "--hidden-layers", "0"]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000  # the conv blocks and the classifier
