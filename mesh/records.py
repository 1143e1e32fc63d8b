"""Discovery records, as the article keeps them: {service name, weight, timestamp, valid} per endpoint.

Read from the Envoys' own view, not from our plan: every Envoy that calls a stage (the gateway, and the
sidecars of the stage before it) answers `/clusters?format=json` with each endpoint of each version's
cluster (`outbound|<version>|<stage>`) and its health (`eds_health_status`, `failed_outlier_check` when
outlier detection ejected it), and `/config_dump` with its route, whose weighted clusters are the
versions' weights. An endpoint is valid when every caller sees it healthy, none has ejected it, and its
own sidecar's health check passes on its app (the local stand-in for a pod's readiness, which Istio's
EDS carries to the callers).

Envoy keeps no timestamp of an endpoint's health, so "last seen healthy" is when a reading found it
valid: each reading updates `records.json` in the state directory, and an endpoint that is invalid now
keeps the time it was last seen valid (None: never, since the mesh started).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mesh import sockets
from mesh.envoy_config import cluster_name
from mesh.local import GATEWAY, State, sees_app_healthy

RECORDS_FILE = "records.json"
ADMIN_TIMEOUT_S = 5.0


@dataclass
class EndpointRecord:
    """One endpoint of one version of one stage, as the Envoys that call it see it."""

    service: str  # the stage: its Kubernetes Service name
    version: str
    weight: int  # percent of the stage's requests its callers route to this version
    address: str  # host:port the callers connect to (the replica's sidecar inbound listener)
    replica: str | None  # which replica of the layout listens there
    healthy: bool  # every caller sees it HEALTHY, and its own sidecar's check passes on its app (its readiness)
    ejected: bool  # some caller's outlier detection has ejected it
    last_seen_healthy: float | None  # unix time of the last reading that found it valid
    observers: list[str] = field(default_factory=list)  # the Envoys that reported it

    @property
    def valid(self) -> bool:
        return self.healthy and not self.ejected

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "valid": self.valid}


@dataclass
class Reading:
    """Every record, when it was read, and the callers whose admin did not answer."""

    read_at: float
    records: list[EndpointRecord]
    unreachable: list[str]


def observers(state: State) -> dict[str, str]:
    """The Envoys holding outbound clusters, by name, with their admin sockets: the gateway and every sidecar
    of a stage that calls another."""
    found = {GATEWAY: state.layout.gateway_admin_socket}
    for r in state.all_replicas():
        if r.outbound_socket is not None:
            found[f"{r.name}-sidecar"] = r.admin_socket
    return found


def parse_cluster(name: str) -> tuple[str, str] | None:
    """`outbound|v1|tiny-stage-1` -> (stage, version); None for any other cluster."""
    parts = name.split("|")
    if len(parts) != 3 or parts[0] != "outbound" or cluster_name(parts[2], parts[1]) != name:
        return None
    return parts[2], parts[1]


def route_weights(config_dump: dict[str, Any]) -> dict[tuple[str, str], int]:
    """(stage, version) -> weight of every outbound cluster the Envoy's routes send to."""
    weights: dict[tuple[str, str], int] = {}
    for config in config_dump.get("configs", []):
        for host in config.get("route_config", {}).get("virtual_hosts", []):
            for route in host.get("routes", []):
                action = route.get("route", {})
                split = action.get("weighted_clusters", {}).get("clusters", [])
                targets = [(action["cluster"], 100)] if "cluster" in action else [
                    (c["name"], int(c.get("weight", 0))) for c in split]
                for cluster, weight in targets:
                    parsed = parse_cluster(cluster)
                    if parsed:
                        weights[parsed] = weight
    return weights


def routed_weights(state: State, stage: str) -> dict[str, dict[str, int] | None]:
    """Per calling Envoy, the weight its live route gives each version of `stage` (None: admin did not answer)."""
    out: dict[str, dict[str, int] | None] = {}
    for name, admin_socket in observers(state).items():
        try:
            dump = sockets.get(admin_socket, "/config_dump", resource="dynamic_route_configs")
            weights = route_weights(dump.json())
        except (httpx.HTTPError, ValueError):
            out[name] = None
            continue
        out[name] = {version: weight for (s, version), weight in weights.items() if s == stage}
    return out


def host_views(clusters: dict[str, Any]) -> list[tuple[str, str, str, bool, bool]]:
    """(stage, version, address, healthy, ejected) of every host of every outbound cluster."""
    out = []
    for cluster in clusters.get("cluster_statuses", []):
        parsed = parse_cluster(cluster.get("name", ""))
        if parsed is None:
            continue
        for host in cluster.get("host_statuses", []):
            socket = host["address"]["socket_address"]
            health = host.get("health_status", {})
            healthy = health.get("eds_health_status", "HEALTHY") == "HEALTHY" and not health.get(
                "failed_active_health_check", False)
            out.append((*parsed, f"{socket['address']}:{socket['port_value']}", healthy,
                        bool(health.get("failed_outlier_check", False))))
    return out


def _load_seen(state_dir: Path) -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((state_dir / RECORDS_FILE).read_text())
        return {str(k): float(v) for k, v in data.items()}
    return {}


def _save_seen(state_dir: Path, seen: dict[str, float]) -> None:
    tmp = state_dir / f".{RECORDS_FILE}.{os.getpid()}"
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
        os.replace(tmp, state_dir / RECORDS_FILE)


def _admin_view(admin_socket: str) -> tuple[dict[str, Any], dict[tuple[str, str], int]]:
    """One Envoy's `/clusters` and the weights of its routes, over its admin socket."""
    with sockets.client(admin_socket, ADMIN_TIMEOUT_S) as client:
        clusters = client.get("/clusters", params={"format": "json"}).json()
        weights = route_weights(client.get("/config_dump", params={"resource": "dynamic_route_configs"}).json())
    return clusters, weights


def read_records(state: State, state_dir: Path) -> Reading:
    """Ask every calling Envoy's admin; merge their views per endpoint; remember when each was valid."""
    merged: dict[tuple[str, str, str], EndpointRecord] = {}
    unreachable = []
    replica_at = {f"127.0.0.1:{r.inbound_port}": r.name for r in state.all_replicas()}
    for name, admin_socket in observers(state).items():
        try:
            clusters, weights = _admin_view(admin_socket)
        except (httpx.HTTPError, ValueError):
            unreachable.append(name)
            continue
        for stage, version, address, healthy, ejected in host_views(clusters):
            key = (stage, version, address)
            record = merged.setdefault(key, EndpointRecord(
                stage, version, weights.get((stage, version), 0), address, replica_at.get(address), True, False,
                None))
            record.healthy &= healthy
            record.ejected |= ejected
            record.weight = max(record.weight, weights.get((stage, version), 0))
            record.observers.append(name)
    # As EDS carries a pod's readiness to its callers: a replica whose sidecar has not (or no longer) seen
    # its app ready answers "no healthy upstream", whatever the callers think of its address.
    admin_of = {r.name: r.admin_socket for r in state.layout.replicas}
    for record in merged.values():
        if record.replica in admin_of and record.healthy:
            record.healthy = sees_app_healthy(admin_of[record.replica])
    now = time.time()
    seen = _load_seen(state_dir)
    for (stage, version, address), record in merged.items():
        seen_key = f"{stage}|{version}|{address}"
        if record.valid:
            seen[seen_key] = now
        record.last_seen_healthy = seen.get(seen_key)
    _save_seen(state_dir, seen)
    order = {s.name: s.index for s in state.policy.stages}
    records = sorted(merged.values(), key=lambda r: (order.get(r.service, 0), r.version, r.address))
    return Reading(now, records, unreachable)
