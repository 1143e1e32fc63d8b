"""The gRPC load driver of the peers benchmark against a real stage process serving KServe v2 gRPC: every
sample answered, counted by `report.summarize` as the HTTP runner's are; a model the server does not serve is
one error naming it before any load."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import grpc_load, report
from model_export.manifest import Manifest
from model_export.samples import random_tensors
from tests.stage_service.procs import HOST, free_port, start_stage, stop_all


def test_closed_loop_over_grpc_against_a_stage(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, manifest = tiny_pipeline
    last = manifest.stages[-1]
    grpc_port = free_port()
    stage = start_stage(directory / "pipeline.json", last.name, env={"STAGE_GRPC_PORT": str(grpc_port)},
                        log_dir=tmp_path)
    try:
        tensors = random_tensors(last.inputs, 1, 0)
        samples = grpc_load.run(f"{HOST}:{grpc_port}", last.name, tensors, concurrency=3, duration_s=1.0)
        summary = report.summarize(samples, 1.0)
        assert summary["requests"] > 10 and summary["ok"] == summary["requests"], summary["errors"]
        with pytest.raises(RuntimeError, match="no-such-model"):
            grpc_load.run(f"{HOST}:{grpc_port}", "no-such-model", tensors, 1, 0.3, timeout_s=1)
    finally:
        stop_all([stage])
