"""How close the local mesh is to Istio: per hop, the local Envoy config beside what istiod generates.

Both sides are read from the Envoy config each one writes for the same plan: the local side from
`mesh.envoy_config` (the gateway's and each sidecar's listeners, routes, clusters), istiod's side from the
listeners, clusters and routes Istio's own generator produced for the rendered tree (the JSON written by
`python -m tests.judges.istiod`: Istio's `pilot/test/xds` fake discovery server, see tools/istio/judge).
For every hop (caller → callee) the fields that make up the policy are compared; `python -m mesh parity`
prints the table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh import envoy_config
from mesh.envoy_grpc import GATEWAY_GRPC, HTTP_PROTOCOL_OPTIONS
from mesh.layout import Layout, Replica
from mesh.layout import plan as plan_layout
from mesh.pki import CertPair
from mesh.plan import GATEWAY, Hop, Plan
from mesh.render import GRPC_PORT, INGRESS_GATEWAY_TARGET_PORT

Json = dict[str, Any]
SERVICE_PORT = 8080  # the port of every stage's Service (render.py), in istiod's cluster and route names
RBAC_FILTER = "envoy.filters.http.rbac"
ENVOY_BUFFER = 1 << 20  # Envoy's per_connection_buffer_limit_bytes where a listener or cluster sets none

# Fields where the two sides must differ, with the reason. Empty: every compared field agrees.
KNOWN_DIFFERENCES: dict[str, str] = {}


@dataclass(frozen=True)
class Row:
    """One compared field of one hop."""

    hop: str
    field: str
    local: str
    istiod: str

    @property
    def same(self) -> bool:
        return self.local == self.istiod

    @property
    def reason(self) -> str | None:
        """Why this field may differ, where it must (KNOWN_DIFFERENCES)."""
        return KNOWN_DIFFERENCES.get(self.field)


def _seconds(value: Any) -> str:
    """A protobuf Duration ("10s", "1.500s") or number as seconds, written one way."""
    number = float(str(value).removesuffix("s"))
    return f"{number:g}s"


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _spiffe_ids(node: Any) -> list[str]:
    return sorted({v for v in _walk(node) if isinstance(v, str) and v.startswith("spiffe://")})


def _http_filters(listener: Json) -> Iterator[Json]:
    for chain in listener.get("filter_chains", []):
        for network_filter in chain.get("filters", []):
            yield from network_filter.get("typed_config", {}).get("http_filters", [])


def _allow_rules(listener: Json) -> list[Json]:
    """The rules of every ALLOW RBAC filter on the listener's HTTP filter chains."""
    rules = [f.get("typed_config", {}).get("rules", {}) for f in _http_filters(listener) if f["name"] == RBAC_FILTER]
    return [r for r in rules if r.get("action", "ALLOW") == "ALLOW"]


def _allowed_principals(listener: Json) -> str:
    """The SPIFFE ids the listener's ALLOW RBAC rules admit."""
    return ",".join(_spiffe_ids(_allow_rules(listener)))


def _required_headers(listener: Json) -> str:
    """The request headers the ALLOW policies that name a principal ask for, as name=value ("-" where none)."""
    wanted = {f"{n['header']['name']}={n['header'].get('string_match', {}).get('exact', '?')}"
              for rules in _allow_rules(listener) for policy in rules.get("policies", {}).values()
              if _spiffe_ids(policy.get("principals"))
              for n in _walk(policy.get("principals")) if isinstance(n, dict) and "header" in n}
    return ",".join(sorted(wanted)) or "-"


def _allowed_paths(listener: Json) -> str:
    """The request paths the ALLOW policies that name a principal admit ("any" where one admits every path)."""
    paths: set[str] = set()
    for rules in _allow_rules(listener):
        for policy in rules.get("policies", {}).values():
            if not _spiffe_ids(policy.get("principals")):
                continue
            matchers = [n["path"] for n in _walk(policy["permissions"]) if isinstance(n, dict) and "path" in n
                        and isinstance(n["path"], dict)]
            if not matchers:
                paths.add("any")
            paths.update(f"{kind}:{value}" for m in matchers for kind, value in m.items())
    return ",".join(sorted(paths))


def _token_fields(listener: Json) -> dict[str, str]:
    """The issuer and audiences the listener's jwt_authn filter checks tokens against ("-" where none)."""
    providers = [p for f in _http_filters(listener) if f["name"] == envoy_config.JWT_FILTER
                 for p in f.get("typed_config", {}).get("providers", {}).values()]
    return {"token issuers": ",".join(sorted(p["issuer"] for p in providers)) or "-",
            "token audiences": ",".join(sorted(a for p in providers for a in p.get("audiences", []))) or "-"}


# -------------------------------------------------------------------------------------- per-hop view


def _route_fields(route: Json, version_of: dict[str, str]) -> dict[str, str]:
    """A route action's policy: timeout, retries, versions by weight (`version_of`: cluster → version)."""
    if "weighted_clusters" in route:
        split = [(version_of[c["name"]], int(c["weight"])) for c in route["weighted_clusters"]["clusters"]]
    else:
        split = [(version_of[route["cluster"]], 100)]
    retry = route.get("retry_policy", {})
    return {
        "route timeout": _seconds(route["timeout"]),
        "weighted clusters": ", ".join(f"{v}={w}" for v, w in split),
        **_retries(retry),
        "retriable status codes": ",".join(str(c) for c in sorted(retry.get("retriable_status_codes", []))),
        "per-try timeout": _seconds(retry["per_try_timeout"]) if "per_try_timeout" in retry else "-",
        "retry host predicate": ",".join(p["name"] for p in retry.get("retry_host_predicate", [])),
        "host selection attempts": str(retry.get("host_selection_retry_max_attempts", "-")),
    }


def _retries(retry: Json) -> dict[str, str]:
    """A retry policy's attempts and conditions."""
    return {"retry attempts": str(retry.get("num_retries", 0)),
            "retry on": ",".join(sorted(retry.get("retry_on", "").split(",")))}


def _headers_set(*levels: Json) -> str:
    """The request headers a route sets over any value sent, from its virtual host's and its own
    `request_headers_to_add` ("-" where none)."""
    entries = [e for level in levels for e in level.get("request_headers_to_add", [])
               if e.get("append_action") == "OVERWRITE_IF_EXISTS_OR_ADD" or e.get("append") is False]
    return ",".join(sorted(f"{e['header']['key']}={e['header']['value']}" for e in entries)) or "-"


def _grpc_route_fields(virtual_host: Json, route: Json) -> dict[str, str]:
    """The gateway's gRPC route: what it matches, its timeout and retries, the headers it sets."""
    return {"route match": ",".join(f"{k}:{v}" for k, v in route["match"].items() if k in ("prefix", "path")),
            "route timeout": _seconds(route["route"]["timeout"]),
            **_retries(route["route"].get("retry_policy", {})),
            "request headers set": _headers_set(virtual_host, route)}


# Envoy's outlier_detection fields, by the short name the table gives them.
OUTLIER_FIELDS = {"consecutive_5xx": "5xx", "enforcing_consecutive_5xx": "5xx enforcing",
                  "consecutive_gateway_failure": "gateway errors",
                  "enforcing_consecutive_gateway_failure": "gateway enforcing",
                  "enforcing_success_rate": "success-rate enforcing", "interval": "interval",
                  "base_ejection_time": "ejection time", "max_ejection_percent": "max ejected %",
                  "split_external_local_origin_errors": "split local origin",
                  "consecutive_local_origin_failure": "local origin failures",
                  "enforcing_consecutive_local_origin_failure": "local origin enforcing"}
POOL_FIELDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def _cluster_fields(version: str, cluster: Json) -> dict[str, str]:
    """One version's upstream cluster: outlier detection, connection pool, buffer limit, TLS SAN."""
    outlier = cluster.get("outlier_detection", {})
    thresholds = (cluster.get("circuit_breakers", {}).get("thresholds") or [{}])[0]
    fields = {f"{version} outlier {label}": (_seconds(outlier[k]) if k in ("interval", "base_ejection_time")
                                             else str(outlier.get(k, "-"))) for k, label in OUTLIER_FIELDS.items()}
    fields |= {f"{version} pool {k}": str(thresholds.get(k, "-")) for k in POOL_FIELDS}
    fields[f"{version} connect timeout"] = _seconds(cluster["connect_timeout"])
    options = cluster.get("typed_extension_protocol_options", {}).get(HTTP_PROTOCOL_OPTIONS, {})
    idle = options.get("common_http_protocol_options", {}).get("idle_timeout")
    fields[f"{version} idle timeout"] = _seconds(idle) if idle else "-"
    fields[f"{version} lb policy"] = cluster.get("lb_policy", "ROUND_ROBIN")
    fields[f"{version} cluster buffer limit"] = str(cluster.get("per_connection_buffer_limit_bytes", ENVOY_BUFFER))
    fields[f"{version} upstream TLS SAN"] = ",".join(_spiffe_ids(cluster.get("transport_socket", {})))
    return fields


def hop_label(hop: Hop) -> str:
    return f"{hop.caller} -> {hop.callee}"


def grpc_label(plan: Plan) -> str:
    return f"{hop_label(plan.hops[0])} (gRPC)"


def _by_name(items: list[Json], name: str, what: str) -> Json:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"no {what} named {name!r} among {[i.get('name') for i in items]}")


# ------------------------------------------------------------------------------------------ local side


def _local_resources(plan: Plan, layout: Layout, caller: str) -> envoy_config.Resources:
    pair, ca, dynamic = CertPair(Path("cert.pem"), Path("key.pem")), Path("ca.pem"), Path("dynamic")
    if caller == GATEWAY:
        return envoy_config.gateway(layout, plan, pair, ca, dynamic, envoy_config.ClientSide(pair, Path("jwks.json")))
    return envoy_config.sidecar(layout, plan, _first_replica(layout, caller), pair, ca, dynamic)


def _first_replica(layout: Layout, stage: str) -> Replica:
    return layout.of_stage(stage)[0]


def local_view(plan: Plan) -> dict[str, dict[str, str]]:
    """Per hop, the compared fields of the local mesh's Envoy config for `plan`."""
    layout = plan_layout(plan, "parity", Path("."), gateway_port=0, socket_dir=Path("/sock"))
    built: dict[str, envoy_config.Resources] = {}

    def resources(workload: str) -> envoy_config.Resources:
        """Each workload's config built once: a stage is the callee of one hop and the caller of the next."""
        if workload not in built:
            built[workload] = _local_resources(plan, layout, workload)
        return built[workload]

    view: dict[str, dict[str, str]] = {}
    for hop in plan.hops:
        caller = resources(hop.caller)
        listener_name = "gateway" if hop.caller == GATEWAY else "outbound"
        virtual_host = _by_name(caller.routes, listener_name, "route")["virtual_hosts"][0]
        route = virtual_host["routes"][0]
        version_of = {envoy_config.cluster_name(hop.callee, v): v for v in hop.upstream.subsets}
        fields = _route_fields(route["route"], version_of)
        fields["request headers set"] = _headers_set(virtual_host, route)
        for version in hop.upstream.subsets:
            fields |= _cluster_fields(version, _by_name(caller.clusters, envoy_config.cluster_name(hop.callee, version),
                                                        "cluster"))
        listener = _by_name(caller.listeners, listener_name, "listener")
        fields["caller listener buffer limit"] = str(listener.get("per_connection_buffer_limit_bytes", ENVOY_BUFFER))
        fields |= _token_fields(listener)
        inbound = _by_name(resources(hop.callee).listeners, "inbound", "listener")
        fields["inbound RBAC principals"] = _allowed_principals(inbound)
        fields["inbound RBAC paths"] = _allowed_paths(inbound)
        fields["inbound RBAC required headers"] = _required_headers(inbound)
        view[hop_label(hop)] = fields
    grpc_host = _by_name(resources(GATEWAY).routes, GATEWAY_GRPC, "route")["virtual_hosts"][0]
    view[grpc_label(plan)] = _grpc_route_fields(grpc_host, grpc_host["routes"][0])
    return view


# ----------------------------------------------------------------------------------------- istiod side


def istiod_cluster_name(plan: Plan, stage: str, version: str) -> str:
    return f"outbound|{SERVICE_PORT}|{version}|{stage}.{plan.namespace}.svc.cluster.local"


def _proxy_name(plan: Plan, workload: str) -> str:
    """The name `tests.judges.istiod` gives a proxy: Istio's ingress gateway, or a stage's first Deployment."""
    if workload == GATEWAY:
        return "istio-ingressgateway"
    return f"{workload}-{plan.stage(workload).versions[0].name}"


def _istiod_route(plan: Plan, proxy: Json, hop: Hop, port: int = SERVICE_PORT) -> tuple[Json, Json]:
    """The virtual host and route that send `hop`'s calls on the callee's Service `port` (REST's, or gRPC's)
    to a subset of it."""
    host = f"{hop.callee}.{plan.namespace}.svc.cluster.local"
    for route_config in proxy["routes"]:
        for virtual_host in route_config.get("virtual_hosts", []):
            for route in virtual_host.get("routes", []):
                action = route.get("route", {})
                targets = [action.get("cluster", "")] + [c["name"] for c in
                                                         action.get("weighted_clusters", {}).get("clusters", [])]
                if any(t.startswith(f"outbound|{port}|") and t.endswith(f"|{host}") and t.split("|")[2]
                       for t in targets):
                    return virtual_host, route
    raise KeyError(f"istiod generated no route to a subset of {host} for {hop.caller}")


def istiod_view(plan: Plan, generated: dict[str, Json]) -> dict[str, dict[str, str]]:
    """Per hop, the same fields read from istiod's generated config (`tests.judges.istiod` output)."""
    view: dict[str, dict[str, str]] = {}
    for hop in plan.hops:
        caller = generated[_proxy_name(plan, hop.caller)]
        version_of = {istiod_cluster_name(plan, hop.callee, v): v for v in hop.upstream.subsets}
        virtual_host, route = _istiod_route(plan, caller, hop)
        fields = _route_fields(route["route"], version_of)
        fields["request headers set"] = _headers_set(virtual_host, route)
        for version in hop.upstream.subsets:
            fields |= _cluster_fields(version, _by_name(caller["clusters"],
                                                        istiod_cluster_name(plan, hop.callee, version), "cluster"))
        port = INGRESS_GATEWAY_TARGET_PORT if hop.caller == GATEWAY else SERVICE_PORT
        listener = _by_name(caller["listeners"], f"0.0.0.0_{port}", "listener")
        fields["caller listener buffer limit"] = str(listener.get("per_connection_buffer_limit_bytes", ENVOY_BUFFER))
        fields |= _token_fields(listener)
        inbound = _by_name(generated[_proxy_name(plan, hop.callee)]["listeners"], "virtualInbound", "listener")
        fields["inbound RBAC principals"] = _allowed_principals(inbound)
        fields["inbound RBAC paths"] = _allowed_paths(inbound)
        fields["inbound RBAC required headers"] = _required_headers(inbound)
        view[hop_label(hop)] = fields
    grpc_host, grpc_route = _istiod_route(plan, generated[_proxy_name(plan, GATEWAY)], plan.hops[0], GRPC_PORT)
    view[grpc_label(plan)] = _grpc_route_fields(grpc_host, grpc_route)
    return view


def compare(plan: Plan, generated: dict[str, Json]) -> list[Row]:
    """Every compared field of every hop, local beside istiod."""
    local, istiod = local_view(plan), istiod_view(plan, generated)
    return [Row(hop=hop, field=name, local=value, istiod=istiod[hop].get(name, "(absent)"))
            for hop, fields in local.items() for name, value in fields.items()]


def unexplained(rows: list[Row]) -> list[Row]:
    """Rows where the two meshes differ and no reason says they must."""
    return [r for r in rows if not r.same and r.reason is None]


def short(value: str, width: int) -> str:
    """A value cut to `width` characters, SPIFFE ids written as `sa/<name>`."""
    value = re.sub(r"spiffe://cluster\.local/ns/[^/]+/sa/", "sa/", value)
    return value if len(value) <= width else value[: width - 1] + "…"
