"""Envoy configuration for the local mesh, generated from the layout and the resolved policy.

Every Envoy gets a static bootstrap (node, admin) that points at `lds.json` and `cds.json` in a
directory Envoy watches, and its listeners take their routes from `rds-<listener>.json` beside them: writing the files
again (atomically, by rename) applies a new policy without restarting anything, and a route change (weights,
timeouts, retries) applies even to connections already open. What goes where mirrors Istio:

- a stage's sidecar has an `inbound` listener (mTLS required, RBAC admitting only the previous stage's
  SPIFFE id, or the gateway's for the first stage) in front of its app, and, unless it is the last
  stage, an `outbound` listener on loopback that the app calls the next stage through;
- calls into stage S carry S's policy: the caller's route holds S's timeout and retries and splits
  traffic across S's versions by weight; one cluster per version holds S's outlier detection,
  connection pool and buffer limit and originates mTLS with the caller's certificate, checking the
  server's SPIFFE id;
- the gateway is the same outbound half in front of the first stage, on the policy's gateway port.

`per_connection_buffer_limit_bytes` is raised on listeners and clusters that carry a stage's activations:
Envoy does not retry a request whose body outgrew the buffer (1 MiB by default).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.layout import LOOPBACK, Layout, Replica
from mesh.pki import CertPair
from mesh.policy import ResolvedPolicy, ResolvedStage

Json = dict[str, Any]
LDS_FILE = "lds.json"

CDS_FILE = "cds.json"
APP_CLUSTER = "inbound|app"
CONNECT_TIMEOUT = "1s"
MAX_DOWNSTREAM_CONNECTIONS = 16384


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _typed(type_name: str, **fields: Any) -> Json:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _address(port: int) -> Json:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def cluster_name(stage: str, version: str) -> str:
    """`outbound|<version>|<stage>`, after Istio's `outbound|<port>|<subset>|<host>`."""
    return f"outbound|{version}|{stage}"


def _tls_certificate(pair: CertPair) -> Json:
    return {"certificate_chain": {"filename": str(pair.cert)}, "private_key": {"filename": str(pair.key)}}


def _upstream_tls(identity: CertPair, ca: Path, server_spiffe_id: str) -> Json:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context={
                "tls_certificates": [_tls_certificate(identity)],
                "validation_context": {
                    "trusted_ca": {"filename": str(ca)},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": server_spiffe_id}}],
                },
                "alpn_protocols": ["http/1.1"],
            },
        ),
    }


def _downstream_mtls(identity: CertPair, ca: Path) -> Json:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            require_client_certificate=True,
            common_tls_context={
                "tls_certificates": [_tls_certificate(identity)],
                "validation_context": {"trusted_ca": {"filename": str(ca)}},
                "alpn_protocols": ["http/1.1"],
            },
        ),
    }


def _access_log() -> list[Json]:
    return [{"name": "envoy.access_loggers.stdout",
             "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog")}]


def _router() -> Json:
    return {"name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


def _rbac(allowed_spiffe_id: str) -> Json:
    """Envoy's RBAC filter: ALLOW only the caller whose certificate carries `allowed_spiffe_id`, else 403."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": _typed(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules={
                "action": "ALLOW",
                "policies": {
                    "allow-previous-hop": {
                        "permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": allowed_spiffe_id}}}],
                    }
                },
            },
        ),
    }


def _config_source(dynamic_dir: Path, file: str) -> Json:
    return {"path_config_source": {"path": str(dynamic_dir / file), "watched_directory": {"path": str(dynamic_dir)}},
            "resource_api_version": "V3"}


def rds_file(route_name: str) -> str:
    """A file-based RDS subscription reads exactly one RouteConfiguration: one file per route name."""
    return f"rds-{route_name}.json"


def _hcm(stat_prefix: str, dynamic_dir: Path, filters: list[Json], **extra: Any) -> Json:
    """An HTTP connection manager whose routes come from RDS (the watched `rds-<name>.json`): a new route (weights,
    timeouts, retries) then applies to open connections too, where a listener change would drain them."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=stat_prefix,
            codec_type="AUTO",
            rds={"config_source": _config_source(dynamic_dir, rds_file(stat_prefix)), "route_config_name": stat_prefix},
            http_filters=[*filters, _router()],
            access_log=_access_log(),
            **extra,
        ),
    }


def _route_config(name: str, action: Json) -> Json:
    return {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"],
                                             "routes": [{"match": {"prefix": "/"}, "route": action}]}]}


def route_to(stage: ResolvedStage) -> Json:
    """The route action for calls into `stage`: its timeout, its retries, its versions by weight."""
    action: Json = {"timeout": _seconds(stage.timeout_s)}
    weighted = [v for v in stage.versions if v.weight > 0]
    if len(weighted) == 1:
        action["cluster"] = cluster_name(stage.name, weighted[0].name)
    else:
        action["weighted_clusters"] = {
            "clusters": [{"name": cluster_name(stage.name, v.name), "weight": v.weight} for v in weighted]
        }
    retries = stage.retries
    if retries.attempts > 0:
        codes = [int(v) for v in retries.retry_on if v.isdigit()]
        retry_on = [v for v in retries.retry_on if not v.isdigit()]
        if codes and "retriable-status-codes" not in retry_on:
            retry_on.append("retriable-status-codes")
        policy: Json = {
            "retry_on": ",".join(retry_on),
            "num_retries": retries.attempts,
            "per_try_timeout": _seconds(stage.per_try_timeout_s),
            # Like Istio: a retry goes to another endpoint than the one that just failed, where there is one.
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }],
            "host_selection_retry_max_attempts": 5,
        }
        if codes:
            policy["retriable_status_codes"] = codes
        action["retry_policy"] = policy
    return action


def outbound_clusters(layout: Layout, stage: ResolvedStage, identity: CertPair, ca: Path,
                      server_spiffe_id: str) -> list[Json]:
    """One cluster per version of `stage`, its endpoints the inbound ports of that version's replicas."""
    pool = stage.connection_pool
    od = stage.outlier_detection
    clusters = []
    for version in stage.versions:
        name = cluster_name(stage.name, version.name)
        endpoints = [{"endpoint": {"address": _address(r.inbound_port)}}
                     for r in layout.of_version(stage.name, version.name)]
        clusters.append({
            "name": name,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "lb_policy": "LEAST_REQUEST",
            "per_connection_buffer_limit_bytes": stage.buffer_limit_bytes,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
            "circuit_breakers": {"thresholds": [{
                "max_connections": pool.max_connections,
                "max_pending_requests": pool.max_pending_requests,
                "max_requests": pool.max_requests,
                # Envoy's default of 3 concurrent retries would turn a replica's death under load into
                # overflow errors; Istio lifts it too.
                "max_retries": pool.max_requests,
            }]},
            "outlier_detection": {
                "consecutive_5xx": od.consecutive_5xx,
                "interval": _seconds(od.interval_s),
                "base_ejection_time": _seconds(od.base_ejection_time_s),
                "max_ejection_percent": od.max_ejection_percent,
            },
            "transport_socket": _upstream_tls(identity, ca, server_spiffe_id),
        })
    return clusters


@dataclass
class Resources:
    """What one Envoy serves: listeners (LDS), their routes (RDS), clusters (CDS)."""

    listeners: list[Json] = field(default_factory=list)
    routes: list[Json] = field(default_factory=list)
    clusters: list[Json] = field(default_factory=list)


def _outbound(res: Resources, name: str, port: int, stage: ResolvedStage, dynamic_dir: Path) -> None:
    res.listeners.append({
        "name": name,
        "address": _address(port),
        "per_connection_buffer_limit_bytes": stage.buffer_limit_bytes,
        "filter_chains": [{"filters": [_hcm(name, dynamic_dir, [])]}],
    })
    res.routes.append(_route_config(name, route_to(stage)))


def sidecar(layout: Layout, policy: ResolvedPolicy, replica: Replica, identity: CertPair, ca: Path,
            dynamic_dir: Path) -> Resources:
    """Listeners, routes and clusters of one replica's sidecar."""
    stage = policy.stages[replica.index]
    res = Resources()
    res.listeners.append({
        "name": "inbound",
        "address": _address(replica.inbound_port),
        "per_connection_buffer_limit_bytes": stage.buffer_limit_bytes,
        "filter_chains": [{
            "transport_socket": _downstream_mtls(identity, ca),
            "filters": [_hcm(
                "inbound",
                dynamic_dir,
                [_rbac("spiffe://" + policy.caller_principal(stage.name))],
                forward_client_cert_details="SANITIZE_SET",
                set_current_client_cert_details={"uri": True},
            )],
        }],
    })
    # The caller's sidecar owns the timeout; the inbound side never cuts a request short.
    res.routes.append(_route_config("inbound", {"cluster": APP_CLUSTER, "timeout": "0s"}))
    res.clusters.append({
        "name": APP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": stage.buffer_limit_bytes,
        "load_assignment": {"cluster_name": APP_CLUSTER,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(replica.app_port)}}]}]},
    })
    if replica.outbound_port is not None:
        nxt = policy.stages[replica.index + 1]
        _outbound(res, "outbound", replica.outbound_port, nxt, dynamic_dir)
        res.clusters += outbound_clusters(layout, nxt, identity, ca, policy.spiffe_id(nxt.name))
    return res


def gateway(layout: Layout, policy: ResolvedPolicy, identity: CertPair, ca: Path, dynamic_dir: Path) -> Resources:
    """Listener, route and clusters of the gateway: plaintext HTTP in, mTLS to the first stage."""
    first = policy.stages[0]
    res = Resources()
    _outbound(res, "gateway", layout.gateway_port, first, dynamic_dir)
    res.clusters += outbound_clusters(layout, first, identity, ca, policy.spiffe_id(first.name))
    return res


def bootstrap(node_id: str, cluster: str, admin_port: int, dynamic_dir: Path) -> Json:
    """Static part: node, admin, and LDS/CDS read from files in a watched directory."""

    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": _address(admin_port)},
        "dynamic_resources": {"lds_config": _config_source(dynamic_dir, LDS_FILE),
                              "cds_config": _config_source(dynamic_dir, CDS_FILE)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": _typed(
                "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS),
        }]},
    }


def _atomic_write(path: Path, data: Json) -> None:
    tmp = path.parent.parent / f".{path.parent.name}.{path.name}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_dynamic(dynamic_dir: Path, resources: Resources) -> None:
    """Write CDS, RDS, then LDS (each may name what the one before defines), each by rename so Envoy
    only ever reads whole files."""
    dynamic_dir.mkdir(parents=True, exist_ok=True)

    def response(type_name: str, items: list[Json]) -> Json:
        return {"resources": [_typed(type_name, **r) for r in items]}

    _atomic_write(dynamic_dir / CDS_FILE, response("envoy.config.cluster.v3.Cluster", resources.clusters))
    for route in resources.routes:
        _atomic_write(dynamic_dir / rds_file(route["name"]),
                      response("envoy.config.route.v3.RouteConfiguration", [route]))
    _atomic_write(dynamic_dir / LDS_FILE, response("envoy.config.listener.v3.Listener", resources.listeners))
