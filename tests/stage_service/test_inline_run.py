"""A lone request's short run stays on the event loop (`StageRuntime.runs_inline`, `DataPlane.alone`); with
others in the stage, or a run measured long, or a batcher, it goes to the inference thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model_export.manifest import Manifest
from stage_service import runtime as runtime_module
from stage_service.dataplane import DataPlane, InferCall
from stage_service.metrics import StageMetrics
from stage_service.runtime import StageRuntime, load_stage
from stage_service.settings import StageSettings
from stage_service.tracing import StageTracing


@pytest.fixture
def settings(tiny_pipeline: tuple[Path, Manifest]) -> StageSettings:
    return StageSettings(manifest=tiny_pipeline[0] / "pipeline.json", name="tiny-stage-2")


@pytest.fixture
def stage(settings: StageSettings) -> Iterator[StageRuntime]:
    runtime = load_stage(settings)
    yield runtime
    runtime.close()


def threads_of_runs(stage: StageRuntime, calls: list[tuple[np.ndarray, bool]]) -> list[str]:
    """The thread each `infer(x, alone)` ran on, in order (on_run is told on the run's thread)."""
    seen: list[str] = []
    stage.on_run = lambda _samples: seen.append(threading.current_thread().name)

    async def go() -> None:
        for x, alone in calls:
            await stage.infer({"h2": x}, alone=alone)

    asyncio.run(go())
    return seen


def test_a_lone_short_run_stays_on_the_loop_after_the_first_measured_run(stage: StageRuntime) -> None:
    x = np.ones((2, 24), np.float32)
    assert not stage.runs_inline({"h2": x})  # nothing measured yet
    ran_on = threads_of_runs(stage, [(x, True), (x, True), (x, False)])
    assert ran_on[0].startswith("onnxruntime") and ran_on[1] == "MainThread"
    assert ran_on[2].startswith("onnxruntime")  # not alone: the thread, so other requests' I/O overlaps it
    assert stage.ms_per_sample is not None and stage.ms_per_sample < runtime_module.INLINE_MAX_MS


def test_a_run_estimated_longer_than_the_limit_goes_to_the_thread(stage: StageRuntime) -> None:
    x = np.ones((4, 24), np.float32)
    threads_of_runs(stage, [(x, False)])
    assert stage.ms_per_sample is not None
    stage.ms_per_sample = runtime_module.INLINE_MAX_MS / 3  # 4 samples: over the limit; 2 samples: under it
    assert not stage.runs_inline({"h2": x})
    assert stage.runs_inline({"h2": x[:2]})


def test_with_a_batcher_nothing_runs_inline(settings: StageSettings) -> None:
    batched = load_stage(settings.model_copy(update={"max_batch_size": 4}))
    try:
        batched.ms_per_sample = 0.01
        assert not batched.runs_inline({"h2": np.ones((1, 24), np.float32)})
    finally:
        batched.close()


def test_a_request_is_alone_only_when_no_other_is_in_the_plane_or_holds_body_bytes(
        settings: StageSettings, stage: StageRuntime) -> None:
    plane = DataPlane(settings, stage, StageTracing.disabled(), StageMetrics("tiny", "tiny-stage-2", "v1"), "test")
    call = InferCall(model="tiny-stage-2", version=None, body=b"x" * 100, header_length=None, headers={},
                     route="/v2/models/{name}/infer", path="/v2/models/tiny-stage-2/infer")
    with plane.admission, plane.body_budget.account() as take:
        take(100)
        assert plane.alone(call)
        take(1)  # another request's body arriving
        assert not plane.alone(call)
    with plane.admission, plane.admission:  # two requests in the plane
        assert not plane.alone(call)


def test_a_grpc_call_is_never_alone(settings: StageSettings, stage: StageRuntime) -> None:
    """grpcio receives messages out of the app's sight, so a run on the loop could stall requests it cannot see."""
    plane = DataPlane(settings, stage, StageTracing.disabled(), StageMetrics("tiny", "tiny-stage-2", "v1"), "test")
    call = InferCall(model="tiny-stage-2", version=None, body=b"x" * 100, header_length=None, headers={},
                     sees_arrivals=False)
    with plane.admission:
        assert not plane.alone(call)
