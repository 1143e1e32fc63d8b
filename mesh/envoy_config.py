"""Envoy configuration for the local mesh: a writer of the plan of hops (`mesh.plan`) and the layout.

Every Envoy gets a static bootstrap (node, admin) that points at `lds.json` and `cds.json` in a
directory Envoy watches, and its listeners take their routes from `rds-<listener>.json` beside them: writing the files
again (atomically, by rename) applies a new policy without restarting anything, and a route change (weights,
timeouts, retries) applies even to connections already open. What goes where mirrors Istio:

- a stage's sidecar has an `inbound` listener (mTLS required, RBAC admitting only the previous stage's
  SPIFFE id, or the gateway's for the first stage) in front of its app (on a Unix socket: `mesh.sockets`),
  and, unless it is the last stage, an `outbound` listener on a Unix socket that the app calls the next
  stage through, forwarding only that stage's model paths;
- the hop into stage S (`Hop`) is written on the caller's side: its route holds the timeout, retries,
  fault injection and the split across S's versions by weight; one cluster per version holds the
  outlier detection, connection pool and buffer limit and originates mTLS with the caller's
  certificate, checking the SAN the hop expects;
- the gateway is the same outbound half in front of the first stage, on the policy's gateway port, behind
  TLS with a server certificate from the mesh's CA and Envoy's jwt_authn filter (`ClientSide`).

`per_connection_buffer_limit_bytes` is raised on listeners and clusters that carry a stage's activations:
Envoy does not retry a request whose body outgrew the buffer (1 MiB by default).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import envoy_grpc, envoy_pinning
from mesh.layout import LOOPBACK, Layout, Replica, subset_name
from mesh.pki import CertPair
from mesh.plan import GATEWAY_SETS, ClientLimits, Hop, Plan, model_paths
from mesh.splits import HEADER, Pinning

Json = dict[str, Any]
LDS_FILE = "lds.json"

CDS_FILE = "cds.json"
APP_CLUSTER = "inbound|app"
CONNECT_TIMEOUT = "1s"
MAX_DOWNSTREAM_CONNECTIONS = 16384
FAULT_FILTER = "envoy.filters.http.fault"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "gateway-auth"
HEALTH_PREFIX = "/v2/health/"
# The sidecar's check of its own app's readiness: what the kubelet's readiness probe is to a pod. A stopping
# app answers not-ready first (STAGE_DRAIN_DELAY_S), and the sidecar stops forwarding to it before it closes.
APP_READY_PATH = "/v2/health/ready"
APP_CHECK_INTERVAL = "0.5s"
APP_CHECK_TIMEOUT = "5s"  # a slow answer on a busy machine is not a failed one


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _typed(type_name: str, **fields: Any) -> Json:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _address(port: int) -> Json:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def pipe(path: str) -> Json:
    """A Unix domain socket address; a listener's socket file gets mode 0600 (its directory is 0700 anyway)."""
    return {"pipe": {"path": path, "mode": 0o600}}


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
                "alpn_protocols": ["h2", "http/1.1"],  # h2: gRPC from the gateway (mesh.envoy_grpc)
            },
        ),
    }


def _access_log() -> list[Json]:
    return [{"name": "envoy.access_loggers.stdout",
             "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog")}]


def _router() -> Json:
    return {"name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


def _route_match(path: str) -> Json:
    """An Istio path (`/x/*` a prefix `/x/`, anything else exact) as a route's match."""
    if path.endswith("/*"):
        return {"prefix": path.removesuffix("*")}
    return {"path": path}


def _path_matcher(path: str) -> Json:
    """An AuthorizationPolicy path as istiod writes it: `/x/*` a prefix `/x/`, anything else exact."""
    if path.endswith("/*"):
        return {"url_path": {"path": {"prefix": path.removesuffix("*")}}}
    return {"url_path": {"path": {"exact": path}}}


def _rbac(hop: Hop) -> Json:
    """Envoy's RBAC filter: ALLOW only callers whose certificate carries one of the hop's principals as its
    SPIFFE id (`spiffe://` + principal, as istiod writes an AuthorizationPolicy's principals), with the hop's
    required headers, and only on its allowed paths, else 403."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": _typed(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules={
                "action": "ALLOW",
                "policies": {
                    "allow-previous-hop": {
                        "permissions": [{"or_rules": {"rules": [_path_matcher(p) for p in hop.allowed_paths]}}],
                        "principals": _principals(hop),
                    }
                },
            },
        ),
    }


def _principals(hop: Hop) -> list[Json]:
    """The callers' SPIFFE ids; with required headers, those ids and each header, as istiod writes an
    AuthorizationPolicy's `when: request.headers[...]` beside its principals."""
    callers = [{"authenticated": {"principal_name": {"exact": f"spiffe://{p}"}}} for p in hop.allowed_principals]
    if not hop.required_headers:
        return callers
    headers = [{"or_ids": {"ids": [{"header": {"name": name, "string_match": {"exact": value}}}]}}
               for name, value in hop.required_headers.items()]
    return [{"and_ids": {"ids": [{"or_ids": {"ids": callers}}, *headers]}}]


def _config_source(dynamic_dir: Path, file: str) -> Json:
    return {"path_config_source": {"path": str(dynamic_dir / file), "watched_directory": {"path": str(dynamic_dir)}},
            "resource_api_version": "V3"}


def rds_file(route_name: str) -> str:
    """A file-based RDS subscription reads exactly one RouteConfiguration: one file per route name."""
    return f"rds-{route_name}.json"


# Envoy's own answer to a transfer coding other than one `chunked` (`gzip, chunked`, the header twice) is 501,
# as RFC 9112 allows; the client sent something this pipeline never accepts, so it gets the 400 the stage
# apps give, naming what was wrong. Only Envoy's local replies are mapped, never an upstream's answer.
UNSUPPORTED_FRAMING = {
    "filter": {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": 501, "runtime_key": "meshpipe.local_reply.not_implemented"}}}},
    "status_code": 400,
    "body": {"inline_string": "unsupported request framing: expected a content-length or one "
                              "'transfer-encoding: chunked'\n"},
}


def client_limits(limits: ClientLimits) -> Json:
    """The connection manager's bounds on what one client may hold (`Clients` in mesh.yaml): headers sent in
    time (else 408), no stream idle for long, headers of bounded size and count (else 431); and framing it
    does not implement answered 400, not 501."""
    return {
        "request_headers_timeout": _seconds(limits.request_headers_timeout_s),
        "stream_idle_timeout": _seconds(limits.stream_idle_timeout_s),
        "max_request_headers_kb": limits.max_request_headers_kb,
        "common_http_protocol_options": {"max_headers_count": limits.max_headers_count},
        "local_reply_config": {"mappers": [UNSUPPORTED_FRAMING]},
    }


def _hcm(stat_prefix: str, dynamic_dir: Path, filters: list[Json], limits: ClientLimits, **extra: Any) -> Json:
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
            **client_limits(limits),
            **extra,
        ),
    }


def not_found(paths: list[str]) -> Json:
    """The last route: 404 for any path not routed, as JSON naming those that are (`{"error": ...}`, as the
    stages' own errors), not Envoy's empty body."""
    body = json.dumps({"error": f"no route for this path here; routed: {', '.join(paths)}"})
    return {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}


def _route_config(name: str, action: Json, paths: list[str] | None = None) -> Json:
    """`action` for every path in `paths` (Istio's form), 404 for any other; `paths` None: every path."""
    routes = ([{"match": _route_match(p), "route": action} for p in paths] + [not_found(paths)] if paths is not None
              else [{"match": {"prefix": "/"}, "route": action}])
    return _route_table(name, routes)


def _route_table(name: str, routes: list[Json]) -> Json:
    """A route configuration of one virtual host, for any domain, with `routes` in order."""
    return {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]}


def _fault_filter() -> Json:
    """Envoy's fault filter with no fault of its own: each route's `typed_per_filter_config` sets one, as
    istiod does, so `mesh apply` changes faults with a route change."""
    return {"name": FAULT_FILTER, "typed_config": _typed("envoy.extensions.filters.http.fault.v3.HTTPFault")}


def _percent(value: float) -> Json:
    """Istio's conversion of a percentage: parts per million."""
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def fault_config(hop: Hop) -> Json | None:
    fault = hop.route.fault
    if fault is None:
        return None
    config: Json = {}
    if fault.delay is not None:
        config["delay"] = {"fixed_delay": _seconds(fault.delay.fixed_delay_s),
                           "percentage": _percent(fault.delay.percent)}
    if fault.abort is not None:
        config["abort"] = {"http_status": fault.abort.http_status, "percentage": _percent(fault.abort.percent)}
    return _typed("envoy.extensions.filters.http.fault.v3.HTTPFault", **config)


def _retry_policy(hop: Hop) -> Json:
    """Istio's translation of an HTTPRetry (`retry.ConvertPolicy`): Envoy's conditions, the status codes, the
    per-try timeout, and retries on another endpoint than the one that just failed."""
    route = hop.route
    policy: Json = {
        "retry_on": ",".join(route.retry_on),
        "num_retries": route.attempts,
        "per_try_timeout": _seconds(route.per_try_timeout_s),
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
        }],
        "host_selection_retry_max_attempts": 5,
    }
    if route.retriable_status_codes:
        policy["retriable_status_codes"] = list(route.retriable_status_codes)
    return policy


def route_to(hop: Hop, split: str | None = None) -> Json:
    """The route action of the hop: its timeout, its retries, its versions by weight (the clusters of
    `split`'s replicas, where they carry one: `Replica.split`)."""
    action: Json = {"timeout": _seconds(hop.route.timeout_s)}
    destinations = hop.route.destinations
    if len(destinations) == 1:
        action["cluster"] = cluster_name(hop.callee, subset_name(split, destinations[0].version))
    else:
        action["weighted_clusters"] = {"clusters": [
            {"name": cluster_name(hop.callee, subset_name(split, d.version)), "weight": d.weight}
            for d in destinations]}
    if hop.route.attempts > 0:
        action["retry_policy"] = _retry_policy(hop)
    return action


def _outlier_detection(hop: Hop) -> Json:
    """Istio's translation of a DestinationRule's outlierDetection (`applyOutlierDetection`)."""
    od = hop.upstream.outlier_detection
    out: Json = {
        "consecutive_5xx": od.consecutive_5xx,
        "enforcing_consecutive_5xx": 100 if od.consecutive_5xx else 0,
        "consecutive_gateway_failure": od.consecutive_gateway_errors,
        "enforcing_consecutive_gateway_failure": 100 if od.consecutive_gateway_errors else 0,
        "enforcing_success_rate": 0,
        "interval": _seconds(od.interval_s),
        "base_ejection_time": _seconds(od.base_ejection_time_s),
        "max_ejection_percent": od.max_ejection_percent,
    }
    if od.split_external_local_origin_errors:
        out["split_external_local_origin_errors"] = True
        out["enforcing_local_origin_success_rate"] = 0
        if od.consecutive_local_origin_failures:
            out["consecutive_local_origin_failure"] = od.consecutive_local_origin_failures
            out["enforcing_consecutive_local_origin_failure"] = 100
    return out


def outbound_clusters(layout: Layout, hop: Hop, identity: CertPair, ca: Path) -> list[Json]:
    """One cluster per version of the callee, its endpoints the inbound ports of that version's replicas."""
    pool = hop.upstream.connection_pool
    thresholds: Json = {"max_connections": pool.max_connections, "max_pending_requests": pool.max_pending_requests,
                        "max_requests": pool.max_requests, "max_retries": pool.max_retries}
    if hop.upstream.retry_budget is not None:
        thresholds["retry_budget"] = {"budget_percent": {"value": hop.upstream.retry_budget.percent},
                                      "min_retry_concurrency": hop.upstream.retry_budget.min_retry_concurrency}
    clusters = []
    for version in hop.upstream.subsets:
        name = cluster_name(hop.callee, subset_name(layout.split, version))
        endpoints = [{"endpoint": {"address": _address(r.inbound_port)}}
                     for r in layout.of_version(hop.callee, version)]
        clusters.append({
            "name": name,
            "type": "STATIC",
            "connect_timeout": _seconds(pool.connect_timeout_s),
            "lb_policy": "LEAST_REQUEST",
            "per_connection_buffer_limit_bytes": hop.upstream.buffer_limit_bytes,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
            "circuit_breakers": {"thresholds": [dict(thresholds)]},
            "typed_extension_protocol_options": envoy_grpc.upstream_protocol(
                http2=False, idle_timeout=_seconds(pool.idle_timeout_s)),
            "outlier_detection": _outlier_detection(hop),
            # Like istiod with outlier detection (minHealthPercent 0): no panic routing to ejected replicas.
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            "transport_socket": _upstream_tls(identity, ca, hop.upstream.expected_san),
        })
    return clusters


@dataclass
class Resources:
    """What one Envoy serves: listeners (LDS), their routes (RDS), clusters (CDS)."""

    listeners: list[Json] = field(default_factory=list)
    routes: list[Json] = field(default_factory=list)
    clusters: list[Json] = field(default_factory=list)


def _outbound(res: Resources, name: str, address: Json, hop: Hop, dynamic_dir: Path, limits: ClientLimits,
              paths: list[str], routes: list[Json] | None = None, first_filters: list[Json] | None = None) -> None:
    """The listener and route of a caller's side of `hop` (`routes`: instead of one route per path; `first_filters`:
    HTTP filters before the fault filter, the gateway's jwt_authn)."""
    res.listeners.append({
        "name": name,
        "address": address,
        "per_connection_buffer_limit_bytes": hop.upstream.buffer_limit_bytes,
        "filter_chains": [{"filters": [_hcm(name, dynamic_dir, [*(first_filters or []), _fault_filter()], limits)]}],
    })
    route = (_route_config(name, route_to(hop), paths) if routes is None
             else _route_table(name, [*routes, not_found(paths)]))
    # As istiod's outbound and gateway virtual hosts: the callee sees x-envoy-attempt-count (1 on a first try).
    route["virtual_hosts"][0]["include_request_attempt_count"] = True
    fault = fault_config(hop)
    if fault is not None:
        for forwarded in route["virtual_hosts"][0]["routes"]:
            if "route" in forwarded:
                forwarded["typed_per_filter_config"] = {FAULT_FILTER: fault}
    res.routes.append(route)


def sidecar(layout: Layout, plan: Plan, replica: Replica, identity: CertPair, ca: Path,
            dynamic_dir: Path, pin: str | None = None) -> Resources:
    """Listeners, routes and clusters of one replica's sidecar (`pin`: the split its chain serves, whose
    requests alone its outbound route passes on: mesh.splits)."""
    inbound = plan.hop_into(replica.stage)
    res = Resources()
    res.listeners.append({
        "name": "inbound",
        "address": _address(replica.inbound_port),
        "per_connection_buffer_limit_bytes": inbound.upstream.buffer_limit_bytes,
        "filter_chains": [{
            "transport_socket": _downstream_mtls(identity, ca),
            "filters": [_hcm(
                "inbound",
                dynamic_dir,
                [_rbac(inbound)],
                plan.clients,
                forward_client_cert_details="SANITIZE_SET",
                set_current_client_cert_details={"uri": True},
            )],
        }],
    })
    # The caller's sidecar owns the timeout; the inbound side never cuts a request short.
    res.routes.append(_route_config("inbound", {"cluster": APP_CLUSTER, "timeout": "0s"}))
    if replica.grpc_socket is not None:
        res.routes[-1]["virtual_hosts"][0]["routes"].insert(0, envoy_grpc.inbound_route())
        res.clusters.append(envoy_grpc.app_cluster(pipe(replica.grpc_socket), CONNECT_TIMEOUT,
                                                   inbound.upstream.buffer_limit_bytes))
    res.clusters.append({
        "name": APP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": inbound.upstream.buffer_limit_bytes,
        "load_assignment": {"cluster_name": APP_CLUSTER,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": pipe(replica.app_socket)}}]}]},
        "health_checks": [{"timeout": APP_CHECK_TIMEOUT, "interval": APP_CHECK_INTERVAL,
                           "no_traffic_interval": APP_CHECK_INTERVAL, "unhealthy_threshold": 1,
                           "healthy_threshold": 1, "http_health_check": {"path": APP_READY_PATH}}],
        # An app that is not ready gets nothing (503 to the caller, who retries elsewhere), never "panic" traffic.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
    })
    outbound = plan.hop_from(replica.stage)
    if replica.outbound_socket is not None and outbound is not None:
        # Only the next stage's own model paths: the app's socket is no open proxy under the stage's identity.
        paths = model_paths(outbound.callee)
        action = route_to(outbound, layout.split)
        refusal = f"{HEADER} names another split than {pin}, the one this chain serves"
        routes = None if pin is None else [
            r for p in paths for r in envoy_pinning.pinned_routes(_route_match(p), {pin: action}, action, refusal)]
        _outbound(res, "outbound", pipe(replica.outbound_socket), outbound, dynamic_dir, plan.clients, paths,
                  routes)
        res.clusters += outbound_clusters(layout, outbound, identity, ca)
    return res


@dataclass(frozen=True)
class ClientSide:
    """What the gateway holds for its clients: its server certificate (used unless the layout says
    `--insecure-gateway`) and the key set their tokens are checked against (used where mesh.yaml's
    `gateway.auth` is enabled)."""

    server_cert: CertPair
    jwks: Path


def _downstream_tls(pair: CertPair) -> Json:
    """TLS towards the gateway's clients: the server certificate only, no client certificate asked for."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context={"tls_certificates": [_tls_certificate(pair)], "alpn_protocols": ["h2", "http/1.1"]},
        ),
    }


def _jwt_authn(plan: Plan, jwks: Path, required: list[Json]) -> Json:
    """Envoy's jwt_authn as istiod writes a RequestAuthentication, over the local key set: a request matching
    `required` needs a valid token of the policy's issuer (401 without one or with a bad one, 403 for another
    audience); the token is checked and removed, never forwarded."""
    auth = plan.gateway.auth
    provider = {"issuer": auth.issuer, "audiences": list(auth.audiences), "local_jwks": {"filename": str(jwks)},
                "payload_in_metadata": auth.issuer}
    return {
        "name": JWT_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={JWT_PROVIDER: provider},
            rules=[{"match": m, "requires": {"provider_name": JWT_PROVIDER}} for m in required],
        ),
    }


def _client_filters(plan: Plan, client_side: ClientSide, required: list[Json]) -> list[Json]:
    return [_jwt_authn(plan, client_side.jwks, required)] if plan.gateway.auth.enabled else []


def gateway(layout: Layout, plan: Plan, identity: CertPair, ca: Path, dynamic_dir: Path, client_side: ClientSide,
            pinning: Pinning | None = None, layouts: dict[str, Layout] | None = None) -> Resources:
    """Listeners, routes and clusters of the gateway: HTTPS in (plain HTTP with `--insecure-gateway`), a token
    required on the pipeline's model paths (health stays open), mTLS to the first stage, only on the plan's
    gateway paths (404 for any other); the gRPC listener the same: a token on every KServe v2 call, no route for
    another service. Every request it forwards carries its mark (GATEWAY_SETS). With `pinning`, to every split's
    first stage (`layouts`: each split's replicas), routed on `x-pipeline-version` (mesh.envoy_pinning)."""
    res = _gateway_routes(layout, plan, identity, ca, dynamic_dir, client_side, pinning, layouts)
    for route_config in res.routes:
        for virtual_host in route_config["virtual_hosts"]:
            virtual_host["request_headers_to_add"] = gateway_sets()
    if layout.gateway_tls:
        for listener in res.listeners:
            listener["filter_chains"][0]["transport_socket"] = _downstream_tls(client_side.server_cert)
    return res


def gateway_sets() -> list[Json]:
    """GATEWAY_SETS as Envoy's headers to add, each replacing any value a client sent (istiod's form of a
    VirtualService's `headers.request.set`)."""
    return [{"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in GATEWAY_SETS.items()]


def _gateway_routes(layout: Layout, plan: Plan, identity: CertPair, ca: Path, dynamic_dir: Path,
                    client_side: ClientSide, pinning: Pinning | None,
                    layouts: dict[str, Layout] | None) -> Resources:
    first = plan.hops[0]
    res = Resources()
    address = _address(layout.gateway_port)
    model_paths = [_route_match(p) for p in plan.gateway_paths if not p.startswith(HEALTH_PREFIX)]
    filters = _client_filters(plan, client_side, model_paths)
    if pinning is None or layouts is None:
        _outbound(res, "gateway", address, first, dynamic_dir, plan.clients, plan.gateway_paths, first_filters=filters)
        res.clusters += outbound_clusters(layout, first, identity, ca)
        if layout.gateway_grpc_port is not None:
            _gateway_grpc(res, layout, first, dynamic_dir, plan, client_side)
        return res
    for s in pinning.splits:
        res.clusters += outbound_clusters(layouts[s.name], s.plan.hops[0], identity, ca)
    routes = [r for p in plan.gateway_paths
              for r in _pinned_gateway_routes(pinning, layouts, _route_match(p), lambda action: action)]
    _outbound(res, "gateway", address, first, dynamic_dir, plan.clients, plan.gateway_paths, routes, filters)
    if layout.gateway_grpc_port is not None:
        grpc_routes = _pinned_gateway_routes(pinning, layouts, {"prefix": envoy_grpc.GRPC_PREFIX},
                                             lambda action: envoy_grpc.gateway_route_action(action, first))
        _gateway_grpc(res, layout, first, dynamic_dir, plan, client_side, grpc_routes)
    return res


def _pinned_gateway_routes(pinning: Pinning, layouts: dict[str, Layout], match: Json, convert: Any) -> list[Json]:
    """The gateway's routes of one match: to each split's first stage by header, else assigned by weight."""
    by_split = {s.name: convert(route_to(s.plan.hops[0], layouts[s.name].split)) for s in pinning.splits}
    clusters = {(s.name, d.version): cluster_name(s.plan.hops[0].callee, subset_name(layouts[s.name].split, d.version))
                for s in pinning.splits for d in s.plan.hops[0].route.destinations}
    assign = envoy_pinning.assigning(route_to(pinning.unassigned_hop()), pinning.assignments(), clusters)
    return envoy_pinning.pinned_routes(match, by_split, convert(assign), pinning.refusal())


def _gateway_grpc(res: Resources, layout: Layout, first: Hop, dynamic_dir: Path, plan: Plan,
                  client_side: ClientSide, routes: list[Json] | None = None) -> None:
    """The gateway's gRPC listener, route and HTTP/2 clusters to the first stage (mesh.envoy_grpc): only the
    KServe v2 service is routed, as Istio's gateway VirtualService does."""
    name = envoy_grpc.GATEWAY_GRPC
    filters = _client_filters(plan, client_side, [{"prefix": envoy_grpc.GRPC_PREFIX}])  # as Istio's DENY rule
    res.listeners.append(envoy_grpc.gateway_listener(layout, first, _hcm(name, dynamic_dir, filters, plan.clients)))
    if routes is None:
        routes = [{"match": {"prefix": envoy_grpc.GRPC_PREFIX},
                   "route": envoy_grpc.gateway_route_action(route_to(first), first)}]
    route = _route_table(name, [*routes, envoy_grpc.no_route()])
    route["virtual_hosts"][0]["include_request_attempt_count"] = True
    res.routes.append(route)
    res.clusters += envoy_grpc.gateway_clusters([c for c in res.clusters if c["name"].startswith("outbound|")])


def bootstrap(node_id: str, cluster: str, admin_socket: str, dynamic_dir: Path) -> Json:
    """Static part: node, admin (on a Unix socket only the mesh's user can open: it serves certificates,
    config and `/quitquitquit`), and LDS/CDS read from files in a watched directory."""

    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": pipe(admin_socket)},
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
