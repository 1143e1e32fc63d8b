"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.policy import Policy
from mesh.render import render_tree, write_tree
from model_export.manifest import Manifest
from tests.tiny import write_tiny_pipeline

# The modules that take longest on 2 cores (1-5 minutes each), longest first. `make test` hands whole modules to
# its pytest-xdist workers in collection order (`--no-loadscope-reorder`: xdist's own order puts the modules with
# the most tests first, so these few-test modules came last and one worker ran on alone for minutes at the end).
LONGEST_FIRST = (
    "tests/test_readme.py",
    "tests/model_export/test_zoo.py",
    "tests/mesh/test_rollout.py",
    "tests/mesh/test_split_pinning.py",
    "tests/mesh/test_keeper.py",
    "tests/model_export/test_keras_models.py",
    "tests/mesh/test_local_faults.py",
    "tests/model_export/test_retrain.py",
    "tests/benchmarks/test_reliability.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session", autouse=True)
def own_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`mesh up` records its state directory under $XDG_STATE_HOME: the tests' records stay out of the user's."""
    home = tmp_path_factory.mktemp("xdg-state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(home)
    yield home
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A 3-stage dense chain 16 -> 32 -> 24 -> 4 with its whole model (model.onnx) beside it."""
    directory = tmp_path_factory.mktemp("tiny") / "tiny"
    return directory, write_tiny_pipeline(directory)


@pytest.fixture(scope="session")
def tiny_tree(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline rendered with a policy that exercises every resource: buffer filters and a canary."""
    _, manifest = tiny_pipeline
    policy = Policy.model_validate({
        "namespace": "tiny-ns",
        "defaults": {"buffer_limit_bytes": 4 << 20, "retries": {"attempts": 2, "per_try_timeout_s": 1.0}},
        "stages": {manifest.stages[0].name: {"versions": [{"name": "v1", "weight": 75},
                                                          {"name": "v2", "weight": 25}]}},
    })
    out = tmp_path_factory.mktemp("tiny-tree")
    write_tree(render_tree(manifest, policy), out)
    return out


@pytest.fixture(scope="session")
def pinned_tree(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline and a 2-stage split of the same model, served side by side with requests pinned
    (`splits` at 90/10), rendered."""
    from model_export.split import split_model

    directory, manifest = tiny_pipeline
    two = tmp_path_factory.mktemp("tiny-split") / "tiny-2"
    split_model(directory / "model.onnx", two, stages=2, cuts=["h2"], name=manifest.name, runs=1)
    policy = Policy.model_validate({
        "namespace": "tiny-ns",
        "defaults": {"buffer_limit_bytes": 4 << 20, "retries": {"attempts": 2, "per_try_timeout_s": 1.0}},
        "splits": [{"pipeline": str(directory), "weight": 90}, {"pipeline": str(two), "weight": 10}],
    })
    out = tmp_path_factory.mktemp("pinned-tree")
    write_tree(render_tree(manifest, policy, directory), out)
    return out
