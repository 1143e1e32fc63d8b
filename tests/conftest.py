"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_export.manifest import Manifest
from tests.tiny import write_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A 3-stage dense chain 16 -> 32 -> 24 -> 4 with its whole model (model.onnx) beside it."""
    directory = tmp_path_factory.mktemp("tiny") / "tiny"
    return directory, write_tiny_pipeline(directory)
