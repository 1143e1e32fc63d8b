"""No path around the sidecars on the local mesh (issue 14, item 5): apps, outbound listeners and Envoy admins
listen on Unix sockets in a directory of mode 0700, so the only TCP ports are the gateway's and each sidecar's
mTLS listener; another user of the machine is refused by the kernel; an outbound listener reaches only the next
stage's model. Real processes, real Envoy; the sockets each process listens on are read from /proc."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mesh import local, sockets
from mesh.v2client import infer
from model_export.manifest import Manifest
from tests.listeners import tcp_listening_ports, unix_listening_paths
from tests.mesh.local_mesh import gateway_client, running_mesh

NOBODY = 65534


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh-sockets") / ".mesh"


@pytest.fixture(scope="module")
def mesh(tiny_pipeline: tuple[Path, Manifest], state_dir: Path) -> Iterator[local.State]:
    with running_mesh(tiny_pipeline[0], None, state_dir) as state:
        yield state


def connect_errors_as(uid: int, paths: list[str]) -> list[int]:
    """Per path, the errno a process running as `uid` gets connecting to it (0: it connected). A forked child
    drops to `uid` (group too, no supplementary groups) and reports through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            results = []
            for path in paths:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(path)
                        results.append(0)
                    except OSError as exc:
                        results.append(exc.errno or -1)
            os.write(write, ",".join(map(str, results)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and answer, "the child that dropped privileges failed"
    return [int(e) for e in answer.split(",")]


def test_pipeline_answers_through_the_gateway(mesh: local.State, state_dir: Path,
                                              tiny_pipeline: tuple[Path, Manifest]) -> None:
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    want = ort.InferenceSession(str(tiny_pipeline[0] / "model.onnx")).run(None, {"x": x})[0]
    with gateway_client(state_dir) as client:
        got, _ = infer(client, mesh.layout.gateway_url, "tiny", {"x": x})
    np.testing.assert_allclose(got["y"], want, atol=1e-5, rtol=0)


def test_apps_listen_on_their_sockets_only(mesh: local.State) -> None:
    for replica in mesh.layout.replicas:
        app = next(p for p in mesh.procs if p.name == replica.name)
        assert tcp_listening_ports(app.pid) == set(), replica.name
        expected = {replica.app_socket} | ({replica.grpc_socket} if replica.grpc_socket else set())
        assert unix_listening_paths(app.pid) == expected, replica.name


def test_envoys_listen_on_tcp_only_where_other_workloads_come_in(mesh: local.State) -> None:
    """A sidecar: its mTLS inbound port; the gateway: its HTTP and gRPC ports. Admin and outbound: sockets."""
    layout = mesh.layout
    for replica in layout.replicas:
        sidecar = next(p for p in mesh.procs if p.name == f"{replica.name}-sidecar")
        assert tcp_listening_ports(sidecar.pid) == {replica.inbound_port}, replica.name
        expected = {replica.admin_socket} | ({replica.outbound_socket} if replica.outbound_socket else set())
        assert unix_listening_paths(sidecar.pid) == expected, replica.name
    gateway = next(p for p in mesh.procs if p.role == "gateway")
    assert tcp_listening_ports(gateway.pid) == {layout.gateway_port, layout.gateway_grpc_port}
    assert unix_listening_paths(gateway.pid) == {layout.gateway_admin_socket}
    assert sockets.get(layout.gateway_admin_socket, "/ready").text.strip() == "LIVE"


def test_the_socket_directory_is_private(mesh: local.State) -> None:
    info = Path(mesh.layout.socket_dir).lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


def test_another_user_cannot_connect_to_any_socket(mesh: local.State) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user (uid 65534); the directory's mode is checked above")
    layout = mesh.layout
    paths = [layout.gateway_admin_socket]
    for r in layout.replicas:
        paths += [p for p in (r.app_socket, r.grpc_socket, r.outbound_socket, r.admin_socket) if p is not None]
    assert connect_errors_as(NOBODY, paths) == [errno.EACCES] * len(paths)
    assert connect_errors_as(os.getuid(), paths) == [0] * len(paths)  # the mesh's own user does connect


def test_an_outbound_listener_reaches_only_the_next_stage(mesh: local.State) -> None:
    first, middle, last = (mesh.layout.of_stage(f"tiny-stage-{i}")[0] for i in range(3))
    assert first.outbound_socket and middle.outbound_socket and last.outbound_socket is None
    h1 = {"inputs": [{"name": "h1", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
    with sockets.client(first.outbound_socket, timeout=30.0) as client:
        assert client.get("/v2/models/tiny-stage-1").json()["name"] == "tiny-stage-1"
        answer = client.post("/v2/models/tiny-stage-1/infer", json=h1)
        assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 4]  # on through stage 2
        for path in ("/v2/models/tiny-stage-2", "/v2/models/tiny-stage-2/infer", "/v2/models/tiny",
                     "/v2/models/tiny-stage-0", "/v2/health/ready", "/v2", "/metrics", "/"):
            refused = client.get(path)
            assert refused.status_code == 404 and refused.headers["content-type"] == "application/json", path
            assert refused.json() == {"error": "no route for this path here; routed: /v2/models/tiny-stage-1, "
                                               "/v2/models/tiny-stage-1/*"}, path
    with sockets.client(middle.outbound_socket, timeout=30.0) as client:
        assert client.get("/v2/models/tiny-stage-2").json()["name"] == "tiny-stage-2"
        assert client.get("/v2/models/tiny-stage-1").status_code == 404


def test_socket_directory_is_private_whatever_the_umask_or_depth(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        short = sockets.make_dir(tmp_path / "state")
        deep_state = tmp_path / ("d" * 100) / "state"  # no socket under it would fit a path's 107 bytes
        deep = sockets.make_dir(deep_state)
    finally:
        os.umask(old)
    try:
        assert short == (tmp_path / "state").resolve() / sockets.SOCKET_DIR
        assert not deep.is_relative_to(deep_state) and len(sockets.path(deep, 999999, "admin")) <= 107
        for directory in (short, deep):
            info = directory.lstat()
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid() and not any(directory.iterdir())
    finally:
        sockets.remove_dir(deep)
    assert not deep.exists()
