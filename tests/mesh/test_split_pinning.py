"""Split-version pinning on a real local mesh: a 3-stage pipeline rolled to a 2-stage split of the same model
under steady load, with `mesh split-canary`, `split-promote`, and back with `split-rollback`.

Both splits' stages share names (`pin-stage-0`, `pin-stage-1`) but not their tensors, so a request that
crossed would fail or answer wrong. Every answer must equal the whole model's, and its `x-stage-timing` must
name one split on every stage, with as many stages as that split has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import local
from mesh.procs import alive
from mesh.v2client import STAGE_TIMING, infer, timing_splits
from model_export.manifest import load_manifest
from model_export.split import split_model
from tests.mesh.local_mesh import Check, PhasedLoad, assert_share, mesh_cli, running_mesh
from tests.tiny import write_tiny_pipeline

CLIENTS = 2
HEADER = "x-pipeline-version"


def split_check(url: str, expected: np.ndarray, x: np.ndarray, stages: dict[str, int]) -> Check:
    """One request naming no split: the split that served it, and whether it was one split end to end whose
    output is the whole model's."""

    def check(client: httpx.Client) -> tuple[str, str | None]:
        try:
            out, response = infer(client, url, "pin", {"x": x})
        except httpx.HTTPError as exc:
            return "", f"{type(exc).__name__}: {exc}"
        splits = timing_splits(response.headers.get(STAGE_TIMING))
        served = splits[0] or "unpinned"
        if len(set(splits)) != 1 or (splits[0] and len(splits) != stages[served]):
            return served, f"a mixture: {response.headers.get(STAGE_TIMING)}"
        if not np.allclose(out["y"], expected, atol=1e-5):
            return served, f"not the whole model's output ({served})"
        return served, None

    return check


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pinning")
    write_tiny_pipeline(tmp / "pin-3", name="pin")
    split_model(tmp / "pin-3" / "model.onnx", tmp / "pin-2", stages=2, cuts=["h2"], name="pin", runs=1)
    return {"3": tmp / "pin-3", "2": tmp / "pin-2"}


@pytest.fixture(scope="module")
def mesh(splits: dict[str, Path]) -> Iterator[tuple[local.State, Path]]:
    state_dir = splits["3"].parent / ".mesh"
    with running_mesh(splits["3"], None, state_dir) as state:
        yield state, state_dir


def whole_model(directory: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(directory / "model.onnx"))
    return np.asarray(session.run(None, {"x": x})[0])


def test_refusals_are_one_message(mesh: tuple[local.State, Path], splits: dict[str, Path]) -> None:
    """Run first, on the mesh as `up` left it: one split, not pinned."""
    _, state_dir = mesh
    where = ["--state-dir", str(state_dir)]
    nothing = mesh_cli("split-promote", *where)
    assert nothing.returncode == 2 and "no new split is running" in nothing.stderr
    same = mesh_cli("split-canary", "--pipeline", str(splits["3"]), "--weight", "10", *where)
    assert same.returncode == 2 and "has the running split's cuts" in same.stderr
    weight = mesh_cli("split-canary", "--pipeline", str(splits["2"]), "--weight", "101", *where)
    assert weight.returncode == 2 and "--weight must be 0..100, got 101" in weight.stderr
    assert "Traceback" not in nothing.stderr + same.stderr + weight.stderr


def test_split_rollout_under_load_never_mixes(mesh: tuple[local.State, Path], splits: dict[str, Path]) -> None:
    state, state_dir = mesh
    three, two = (load_manifest(splits[k]).split_id for k in ("3", "2"))
    assert three != two and three.startswith("s3-") and two.startswith("s2-")
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    gateway = local.gateway_credentials(state_dir, state, "tests")
    expected = whole_model(splits["3"], x)
    where = ["--state-dir", str(state_dir)]
    with PhasedLoad(gateway, split_check(gateway.url, expected, x, {three: 3, two: 2}), CLIENTS) as load:
        assert set(load.count("before", 50)) == {"unpinned"}
        canary = mesh_cli("split-canary", "--pipeline", str(splits["2"]), "--weight", "10", *where)
        assert canary.returncode == 0, canary.stderr
        assert f"{three} 90% (3 stages), {two} 10% (2 stages)" in canary.stdout
        assert_share(load.count("10%", 400), two, 10, load.served)
        assert mesh_cli("split-canary", "--weight", "50", *where).returncode == 0
        assert_share(load.count("50%", 400), two, 50, load.served)
        _pinned_by_client(gateway, x, expected, three, two)
        first = {f"pin-stage-{i}-v1-0{suffix}" for i in range(3) for suffix in ("", "-sidecar")}
        old = [p for p in local.read_state(state_dir).procs if p.name in first]  # type: ignore[union-attr]
        promoted = mesh_cli("split-promote", *where)
        assert promoted.returncode == 0, promoted.stderr
        assert f"splits: {two} 100% (2 stages)" in promoted.stdout
        assert set(load.count("promoted", 100)) == {two}
        status = mesh_cli("status", "--json", *where)
        assert json.loads(status.stdout)["splits"] == [
            {"name": two, "weight": 100, "stages": 2, "pipeline_dir": str(splits["2"].resolve())}]
        assert len(old) == 6 and not any(alive(p) for p in old)

        back = mesh_cli("split-canary", "--pipeline", str(splits["3"]), "--weight", "50", *where)
        assert back.returncode == 0, back.stderr
        assert_share(load.count("back 50%", 400), three, 50, load.served)
        rolled = mesh_cli("split-rollback", *where)
        assert rolled.returncode == 0, rolled.stderr
        assert set(load.count("rolled back", 100)) == {two}
    assert load.failures == []
    after = local.read_state(state_dir)
    assert after is not None and after.pinning is not None and after.pinning.names == [two]
    assert len([p for p in after.procs if p.role == "app"]) == 2
    assert "started again" not in (state_dir / "logs" / "keeper.log").read_text()  # nothing stopped came back


def _pinned_by_client(gateway: local.GatewayCredentials, x: np.ndarray, expected: np.ndarray, three: str,
                      two: str) -> None:
    """A client that names a split gets it, over REST and gRPC (TLS and the token, as any client of the gateway);
    one that names no known split gets one 400 naming the known ones."""
    url, grpc_address = gateway.url, gateway.grpc_address
    assert grpc_address is not None
    grpc = triton.InferenceServerClient(grpc_address, ssl=True, root_certificates=str(gateway.ca))
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for split in (three, two, None):
            result = grpc.infer("pin", [tensor], headers={**gateway.headers, **({HEADER: split} if split else {})})
            np.testing.assert_allclose(result.as_numpy("y"), expected, atol=1e-5, rtol=0)
        with pytest.raises(InferenceServerException):
            grpc.infer("pin", [tensor], headers={**gateway.headers, HEADER: "s9-00000000"})
    finally:
        grpc.close()
    with gateway.client(timeout=30.0) as client:
        for split, stages in ((three, 3), (two, 2)):
            _, response = infer(client, url, "pin", {"x": x}, headers={HEADER: split})
            assert timing_splits(response.headers.get(STAGE_TIMING)) == [split] * stages
        tensor = {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": x.ravel().tolist()}
        bad = client.post(f"{url}/v2/models/pin/infer", headers={HEADER: "s9-00000000"}, json={"inputs": [tensor]})
    assert bad.status_code == 400 and three in bad.json()["error"] and two in bad.json()["error"]
