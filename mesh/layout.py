"""Where every process of the local mesh lives: one replica per (stage, version, index), and its ports.

The layout is planned once by `mesh up` from the manifest and the plan of hops (`mesh.plan`), and saved in the state
directory, so `status`, `logs`, `down` and config regeneration all read the same ports.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from pydantic import BaseModel, ConfigDict

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
    app_port: int
    grpc_port: int | None = None  # the app's KServe v2 gRPC port, behind the same inbound listener
    inbound_port: int  # the sidecar's mTLS listener, the only port other workloads call
    outbound_port: int | None  # the sidecar's plaintext listener the app calls the next stage through
    admin_port: int  # the sidecar's Envoy admin

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.version}-{self.replica}"


class Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str
    pipeline_dir: str
    gateway_port: int
    gateway_admin_port: int
    gateway_grpc_port: int | None = None  # the gateway's gRPC listener (HTTP/2 cleartext)
    replicas: list[Replica]

    def of_stage(self, stage: str) -> list[Replica]:
        return [r for r in self.replicas if r.stage == stage]

    def of_version(self, stage: str, version: str) -> list[Replica]:
        return [r for r in self.replicas if r.stage == stage and r.version == version]

    @property
    def gateway_url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def gateway_grpc_address(self) -> str | None:
        return f"{LOOPBACK}:{self.gateway_grpc_port}" if self.gateway_grpc_port else None


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


def plan(resolved: Plan, pipeline: str, pipeline_dir: Path, gateway_port: int | None = None) -> Layout:
    """Assign free loopback ports to the gateway and to every replica of every version of every stage.

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

        replicas = []
        last = len(resolved.stages) - 1
        for stage in resolved.stages:
            for version in stage.versions:
                for k in range(stage.replicas):
                    replicas.append(
                        Replica(
                            stage=stage.name,
                            index=stage.index,
                            version=version.name,
                            replica=k,
                            file=str((pipeline_dir / version.file).resolve()) if version.file else None,
                            app_port=free(),
                            # gRPC where clients come in only (mesh.envoy_grpc); stages chain over REST
                            grpc_port=free() if stage.index == 0 else None,
                            inbound_port=free(),
                            outbound_port=free() if stage.index < last else None,
                            admin_port=free(),
                        )
                    )
        return Layout(
            pipeline=pipeline,
            pipeline_dir=str(pipeline_dir.resolve()),
            gateway_port=port or free(),
            gateway_admin_port=free(),
            gateway_grpc_port=free(),
            replicas=replicas,
        )
