"""Stages whose weights are ONNX external data (`split --external-data`): the manifest names and hashes the
data file, a real chain serves them (onnxruntime maps the file; prepacking off by default), and a changed
data file keeps the stage from starting."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from model_export.manifest import Manifest, load_manifest
from stage_service.protocol import decode_response, request_body
from tests.stage_service.procs import free_port, stage_command, stage_env, start_chain, stop_all
from tests.tiny import write_tiny_pipeline

WIDTHS = (16, 64, 32, 4)  # the first two stages' weights are over the 1 KiB threshold, the last one's is not


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    directory = tmp_path_factory.mktemp("external") / "ext"
    return directory, write_tiny_pipeline(directory, name="ext", widths=WIDTHS, external_data=True)


def test_the_manifest_names_and_hashes_each_data_file(external: tuple[Path, Manifest]) -> None:
    directory, _ = external
    stages = load_manifest(directory).stages
    assert [s.data_file for s in stages] == ["stage-0.onnx.data", "stage-1.onnx.data", None]
    for stage in stages[:2]:
        data = directory / str(stage.data_file)
        assert data.stat().st_size >= 4 * WIDTHS[0] * WIDTHS[1] // 2
        assert (directory / stage.file).stat().st_size < data.stat().st_size  # the weights left the model file


def test_a_chain_of_external_data_stages_computes_the_whole_model(external: tuple[Path, Manifest],
                                                                   tmp_path: Path) -> None:
    directory, manifest = external
    x = np.random.default_rng(3).standard_normal((2, WIDTHS[0])).astype(np.float32)
    whole = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = whole.run(None, {"x": x})[0]
    stages = start_chain(directory / "pipeline.json", log_dir=tmp_path)
    try:
        body, headers = request_body({"x": x})
        r = httpx.post(f"{stages[0].url}/v2/models/{manifest.name}/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        _, outputs = decode_response(r.content, r.headers.get("inference-header-content-length"))
        np.testing.assert_allclose(outputs["y"], expected, rtol=1e-5, atol=1e-6)
    finally:
        assert stop_all(stages) == [0, 0, 0], "\n".join(s.log() for s in stages)


def test_a_changed_data_file_refuses_to_start(external: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory = tmp_path / "tampered"
    shutil.copytree(external[0], directory)
    data = directory / "stage-1.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    env = stage_env(directory / "pipeline.json", "ext-stage-1", free_port(), next_url=f"http://127.0.0.1:{free_port()}")
    done = subprocess.run(stage_command(), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "stage-1.onnx.data" in done.stderr and "sha256" in done.stderr and "refusing to start" in done.stderr
