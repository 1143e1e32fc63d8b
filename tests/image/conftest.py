"""Fixtures of the image tests: the engine, the CPU image built as `make image` builds it, a 2-stage
pipeline written by `split`, and its two stage containers. The image's size and build time are printed in
the run's summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model_export.manifest import Manifest, load_manifest
from model_export.split import split_model
from stage_service.launch import free_port
from tests.image.containers import (
    BuiltImage,
    DockerError,
    StageContainer,
    build_image,
    new_run_id,
    remove,
    remove_orphans,
    remove_run,
    run_stage,
    start_engine,
    wait_ready,
)

REPORTS: list[str] = []


@pytest.fixture(scope="session")
def engine() -> None:
    try:
        start_engine()
    except DockerError as exc:
        pytest.fail(f"no Docker engine: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    built = build_image(tmp_path_factory.mktemp("image"))
    REPORTS.append(built.report)
    return built


@pytest.fixture(scope="session")
def run_id(engine: None) -> Iterator[str]:
    remove_orphans()
    run = new_run_id()
    yield run
    remove_run(run)


@pytest.fixture(scope="session")
def pipeline(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dense chain's whole model split into 2 stages by `split` (as a user would), mounted as is."""
    directory, _ = tiny_pipeline
    out = tmp_path_factory.mktemp("split") / "boxed"
    split_model(directory / "model.onnx", out, 2, runs=1)
    assert [s.name for s in load_manifest(out).stages] == ["boxed-stage-0", "boxed-stage-1"]
    return out


@pytest.fixture(scope="module")
def chain(image: BuiltImage, run_id: str, pipeline: Path) -> Iterator[list[StageContainer]]:
    """boxed-stage-0 -> boxed-stage-1, each in its own container, both ready; removed after the module."""
    port0, port1 = free_port(), free_port()
    last = run_stage(image.id, run_id, pipeline, "boxed-stage-1", port1)
    first = run_stage(image.id, run_id, pipeline, "boxed-stage-0", port0, next_url=last.url)
    try:
        for container in (first, last):
            wait_ready(container)
        yield [first, last]
    finally:
        remove(first, last)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in REPORTS:
        terminalreporter.write_line(f"image: {line}")
