"""`mesh canary`, `promote` and `rollback` on a real local mesh under steady load: the new version's replicas
start beside the old, the split follows the weights within 5 points, `x-stage-timing` names the version that
answered (and the answer is that version's), promote and rollback stop the side that leaves, and no
request fails through any of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mesh import local
from mesh.policy import load_policy
from mesh.procs import alive
from mesh.render import render_tree
from mesh.v2client import STAGE_TIMING, infer, stage_timing
from model_export.manifest import load_manifest
from model_export.stage_version import write_stage_version
from tests.mesh.local_mesh import Check, PhasedLoad, assert_share, mesh_cli, running_mesh
from tests.tiny import dense_stage_graph, write_tiny_pipeline

STAGE = "roll-stage-1"
CLIENTS = 2
SETTLE_S = 1.5  # after a weight change, before counting: Envoy reloads its watched files within moments


def version_check(url: str, expected: dict[str, np.ndarray], x: np.ndarray) -> Check:
    """One request: the stage-1 version that served it, and whether its output is that version's chain's."""

    def check(client: httpx.Client) -> tuple[str, str | None]:
        try:
            out, response = infer(client, url, "roll", {"x": x})
            version = next(v for s, v, _ in stage_timing(response.headers.get(STAGE_TIMING)) if s == STAGE)
        except (httpx.HTTPError, StopIteration, KeyError) as exc:
            return "", f"{type(exc).__name__}: {exc}"
        return version, None if np.allclose(out["y"], expected[version], atol=1e-5) else f"not {version}"

    return check


def chain_output(directory: Path, stages: list[str], x: np.ndarray) -> np.ndarray:
    for file in stages:
        session = ort.InferenceSession(str(directory / file))
        x = session.run(None, {session.get_inputs()[0].name: x})[0]
    return x


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rollout")
    write_tiny_pipeline(tmp / "roll", name="roll")
    write_stage_version(tmp / "roll", tmp / "roll-v2", STAGE, dense_stage_graph(1, "h1", "h2", 32, 24, 42))
    write_stage_version(tmp / "roll-v2", tmp / "roll-v3", STAGE, dense_stage_graph(1, "h1", "h2", 32, 24, 43))
    return {"v1": tmp / "roll", "v2": tmp / "roll-v2", "v3": tmp / "roll-v3"}


@pytest.fixture(scope="module")
def mesh(pipelines: dict[str, Path]) -> Iterator[tuple[local.State, Path]]:
    state_dir = pipelines["v1"].parent / ".mesh"
    with running_mesh(pipelines["v1"], None, state_dir) as state:
        yield state, state_dir


def test_canary_promote_and_rollback_under_load(mesh: tuple[local.State, Path], pipelines: dict[str, Path]) -> None:
    state, state_dir = mesh
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    files = {"v1": "stage-1.onnx", "v2": "stage-1-v2.onnx", "v3": "stage-1-v3.onnx"}
    expected = {v: chain_output(pipelines[v], ["stage-0.onnx", files[v], "stage-2.onnx"], x) for v in files}
    assert not np.allclose(expected["v1"], expected["v2"])
    gateway = local.gateway_credentials(state_dir, state, "tests")
    where = ["--state-dir", str(state_dir)]
    with PhasedLoad(gateway, version_check(gateway.url, expected, x), CLIENTS, SETTLE_S) as load:
        assert set(load.count("v1 alone", 100)) == {"v1"}
        canary = mesh_cli("canary", "--stage", STAGE, "--version", "v2", "--weight", "10", "--pipeline",
                          str(pipelines["v2"]), *where)
        assert canary.returncode == 0, canary.stderr
        assert "v1 90% (1 replicas), v2 10% (1 replicas)" in canary.stdout
        assert_share(load.count("10%", 400), "v2", 10, load.served)
        assert mesh_cli("canary", "--stage", STAGE, "--version", "v2", "--weight", "50", *where).returncode == 0
        assert_share(load.count("50%", 400), "v2", 50, load.served)
        # the same policy renders the Kubernetes tree: a Deployment of v2 reading the file from the image's copy
        tree = render_tree(load_manifest(pipelines["v1"]), load_policy(state_dir / "policy.yaml"))
        v2 = tree["overlays/canary/deployment-roll-stage-1-v2.yaml"]
        assert "stage-1-v2.onnx" in v2 and str(pipelines["v2"]) not in v2
        assert (pipelines["v1"] / "stage-1-v2.onnx").is_file()
        v1_procs = [p for p in local.read_state(state_dir).procs if p.name.startswith(f"{STAGE}-v1-")]  # type: ignore[union-attr]
        promoted = mesh_cli("promote", "--stage", STAGE, *where)
        assert promoted.returncode == 0, promoted.stderr
        assert set(load.count("promoted", 100)) == {"v2"}
        assert v1_procs and not any(alive(p) for p in v1_procs)

        assert mesh_cli("canary", "--stage", STAGE, "--version", "v3", "--weight", "50", "--pipeline",
                        str(pipelines["v3"]), *where).returncode == 0
        assert_share(load.count("v3 50%", 400), "v3", 50, load.served)
        v3_procs = [p for p in local.read_state(state_dir).procs if p.name.startswith(f"{STAGE}-v3-")]  # type: ignore[union-attr]
        rolled = mesh_cli("rollback", "--stage", STAGE, *where)
        assert rolled.returncode == 0, rolled.stderr
        assert set(load.count("rolled back", 100)) == {"v2"}
        assert v3_procs and not any(alive(p) for p in v3_procs)
    assert load.failures == []
    # unchanged stages kept their processes all along: nothing was restarted
    before = {p.name: p.pid for p in state.procs if not p.name.startswith(STAGE)}
    after = local.read_state(state_dir)
    assert after is not None and {p.name: p.pid for p in after.procs if not p.name.startswith(STAGE)} == before
    # and the keeper started none of the replicas the rollouts stopped on purpose again
    assert not any(p.name.startswith((f"{STAGE}-v1-", f"{STAGE}-v3-")) for p in after.procs)
    assert "started again" not in (state_dir / "logs" / "keeper.log").read_text()


def test_refusals_are_one_message(mesh: tuple[local.State, Path], pipelines: dict[str, Path]) -> None:
    _, state_dir = mesh
    where = ["--state-dir", str(state_dir)]
    wrong = mesh_cli("canary", "--stage", STAGE, "--version", "v9", "--weight", "10", "--pipeline",
                     str(pipelines["v2"]), *where)
    assert wrong.returncode == 2 and "holds roll-stage-1 v2, not v9" in wrong.stderr
    nothing = mesh_cli("promote", "--stage", STAGE, *where)
    assert nothing.returncode == 2 and "no canary to promote or roll back" in nothing.stderr
    assert "Traceback" not in wrong.stderr + nothing.stderr
