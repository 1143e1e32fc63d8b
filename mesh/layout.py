"""Where every process of the local mesh lives: one replica per (stage, version, index), its ports and sockets.

The layout is planned once by `mesh up` from the manifest and the plan of hops (`mesh.plan`), and saved in the state
directory, so `status`, `logs`, `down` and config regeneration all read the same ports and sockets. Only the
gateway and the sidecars' mTLS listeners are TCP ports; the rest are Unix sockets (mesh.sockets).
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mesh import sockets
from mesh.plan import Plan

LOOPBACK = "127.0.0.1"


class Replica(BaseModel):
    """One pod's worth of processes: a stage_service app and its Envoy sidecar."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    index: int  # the stage's position in the chain
    version: str
    replica: int
    file: str | None  # a replacement ONNX file for this version (absolute), None: the manifest's
    slot: int  # names its sockets (mesh.sockets): unique among the layout's replicas
    app_socket: str  # the app's REST listener (STAGE_UDS), reached only through the sidecar
    grpc_socket: str | None = None  # the app's KServe v2 gRPC listener (STAGE_GRPC_UDS), behind the same inbound
    inbound_port: int  # the sidecar's mTLS listener, the only way other workloads reach the app
    outbound_socket: str | None  # the sidecar's plaintext listener the app calls the next stage through
    admin_socket: str  # the sidecar's Envoy admin
    split: str | None = None  # the split it belongs to, where it was started beside another (mesh.split_rollout)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.subset}-{self.replica}"

    @property
    def subset(self) -> str:
        """Its version as its callers' cluster names it: `<split>-<version>` for a split started beside
        another (whose stages may have the same names), else the version."""
        return subset_name(self.split, self.version)


def subset_name(split: str | None, version: str) -> str:
    return f"{split}-{version}" if split else version


class Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str
    pipeline_dir: str
    socket_dir: str  # mode 0700: every app, outbound listener and Envoy admin listens in it (mesh.sockets)
    gateway_port: int
    gateway_admin_socket: str
    gateway_grpc_port: int | None = None  # the gateway's gRPC listener (HTTP/2)
    # TLS on both gateway listeners, with a server certificate from the mesh's CA; False only by
    # `mesh up --insecure-gateway`, for demos.
    gateway_tls: bool = True
    replicas: list[Replica]
    split: str | None = None  # the split tag of every replica here (Replica.split)

    def of_stage(self, stage: str) -> list[Replica]:
        return [r for r in self.replicas if r.stage == stage]

    def of_version(self, stage: str, version: str) -> list[Replica]:
        return [r for r in self.replicas if r.stage == stage and r.version == version]

    def next_slot(self) -> int:
        return max((r.slot for r in self.replicas), default=-1) + 1

    @property
    def gateway_url(self) -> str:
        return f"{'https' if self.gateway_tls else 'http'}://{LOOPBACK}:{self.gateway_port}"

    @property
    def gateway_grpc_address(self) -> str | None:
        return f"{LOOPBACK}:{self.gateway_grpc_port}" if self.gateway_grpc_port else None


def new_replica(socket_dir: Path, slot: int, stage: str, index: int, last: int, version: str, replica: int,
                file: str | None, inbound_port: int) -> Replica:
    """A replica whose sockets are named by `slot` in `socket_dir`: gRPC where clients come in only (the first
    stage; mesh.envoy_grpc), an outbound listener on every stage but the last."""
    return Replica(stage=stage, index=index, version=version, replica=replica, file=file, slot=slot,
                   app_socket=sockets.path(socket_dir, slot, "app"),
                   grpc_socket=sockets.path(socket_dir, slot, "grpc") if index == 0 else None,
                   inbound_port=inbound_port,
                   outbound_socket=sockets.path(socket_dir, slot, "out") if index < last else None,
                   admin_socket=sockets.path(socket_dir, slot, "admin"))


class PortInUse(RuntimeError):
    """A port the mesh must bind is taken."""


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As Envoy binds: connections of a mesh just stopped, left in TIME_WAIT on the port, do not hold it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError as exc:
            raise PortInUse(f"port {port} on {LOOPBACK} is already in use ({exc.strerror})") from exc


def plan(resolved: Plan, pipeline: str, pipeline_dir: Path, gateway_port: int | None = None, *,
         socket_dir: Path, gateway_tls: bool = True) -> Layout:
    """Assign free loopback ports to the gateway and to every replica's sidecar inbound listener, and sockets in
    `socket_dir` to everything else.

    `gateway_port` overrides the policy's; 0 picks a free one. The sockets that found the free ports stay
    open until all are chosen, so no port is handed out twice.
    """
    port = resolved.gateway.port if gateway_port is None else gateway_port
    if port:
        check_port_free(port)
    with ExitStack() as stack:

        def free() -> int:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            return int(s.getsockname()[1])

        replicas: list[Replica] = []
        last = len(resolved.stages) - 1
        for stage in resolved.stages:
            for version in stage.versions:
                for k in range(stage.replicas):
                    file = str((pipeline_dir / version.file).resolve()) if version.file else None
                    replicas.append(new_replica(socket_dir, len(replicas), stage.name, stage.index, last,
                                                version.name, k, file, free()))
        return Layout(
            pipeline=pipeline,
            pipeline_dir=str(pipeline_dir.resolve()),
            socket_dir=str(socket_dir),
            gateway_port=port or free(),
            gateway_admin_socket=sockets.path(socket_dir, "gateway", "admin"),
            gateway_grpc_port=free(),
            gateway_tls=gateway_tls,
            replicas=replicas,
        )
