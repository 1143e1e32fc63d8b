"""Fixtures of the stage service tests: a real 3-process chain over the tiny pipeline, and its reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_export.manifest import Manifest
from tests.stage_service.procs import StageProcess, start_chain, stop_all

# Small enough that a test can exceed it cheaply, big enough for every normal request here.
MAX_REQUEST_BYTES = 65536


@pytest.fixture(scope="module")
def chain(tiny_pipeline: tuple[Path, Manifest],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[StageProcess]]:
    """tiny-stage-0 -> tiny-stage-1 -> tiny-stage-2, each a real `python -m stage_service` on loopback."""
    directory, _ = tiny_pipeline
    stages = start_chain(directory / "pipeline.json", env={"STAGE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)},
                         log_dir=tmp_path_factory.mktemp("chain-logs"))
    yield stages
    codes = stop_all(stages)
    assert codes == [0, 0, 0], "\n".join(s.log() for s in stages)


@pytest.fixture(scope="session")
def reference(tiny_pipeline: tuple[Path, Manifest]) -> Callable[..., np.ndarray]:
    """Run files of the pipeline directly: reference(x) is the whole model; reference(h, 'stage-1.onnx', ...)."""
    directory, _ = tiny_pipeline
    sessions: dict[str, ort.InferenceSession] = {}

    def run(x: np.ndarray, *files: str) -> np.ndarray:
        for file in files or ("model.onnx",):
            if file not in sessions:
                sessions[file] = ort.InferenceSession(str(directory / file), providers=["CPUExecutionProvider"])
            session = sessions[file]
            x = session.run(None, {session.get_inputs()[0].name: x})[0]
        return x

    return run
