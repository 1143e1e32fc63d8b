"""The gRPC half of the local mesh's Envoy configuration (KServe v2 `inference.GRPCInferenceService`).

Clients reach the first stage's gRPC endpoint through the gateway, as Istio routes a Service port named
`grpc`: the gateway's `gateway-grpc` listener takes HTTP/2 cleartext, and its route to the first stage is the
REST route's (timeout, versions by weight) with retries on the gRPC status codes that mean "try another
replica" (`unavailable`, `cancelled`) besides the connection failures; never on INVALID_ARGUMENT or
RESOURCE_EXHAUSTED, which would only fail again. It rides the same mTLS to the stage's sidecar (ALPN h2), whose
inbound listener sends the gRPC paths to the app's STAGE_GRPC_UDS over HTTP/2 and everything else to REST.
Stage-to-stage stays HTTP/1.1 REST.
"""

from __future__ import annotations

import copy
from typing import Any

from mesh.layout import LOOPBACK, Layout
from mesh.plan import Hop

Json = dict[str, Any]
GRPC_PREFIX = "/inference.GRPCInferenceService/"
GRPC_PATHS = f"{GRPC_PREFIX}*"  # the gateway's gRPC route (Istio's form); any other service: no route (UNIMPLEMENTED)
APP_GRPC_CLUSTER = "inbound|grpc"
GATEWAY_GRPC = "gateway-grpc"
# Envoy's gRPC retry conditions (grpc-status in the answer), and the transport failures any retry covers.
GRPC_RETRY_ON = ("unavailable", "cancelled", "connect-failure", "refused-stream", "reset")
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def upstream_protocol(http2: bool, idle_timeout: str | None = None) -> Json:
    """A cluster's upstream protocol (HTTP/2 for gRPC, which needs it end to end, else HTTP/1.1) and how long
    an idle connection is kept (Envoy's default: an hour)."""
    options: Json = {"@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
                     "explicit_http_config": {"http2_protocol_options" if http2 else "http_protocol_options": {}}}
    if idle_timeout is not None:
        options["common_http_protocol_options"] = {"idle_timeout": idle_timeout}
    return {HTTP_PROTOCOL_OPTIONS: options}


def _http2_upstream() -> Json:
    return upstream_protocol(http2=True)


def grpc_cluster_name(rest_cluster: str) -> str:
    return f"{rest_cluster}|grpc"


def inbound_route() -> Json:
    """The sidecar's inbound route for gRPC paths: to the app's gRPC port, never cut short here."""
    return {"match": {"prefix": GRPC_PREFIX}, "route": {"cluster": APP_GRPC_CLUSTER, "timeout": "0s"}}


def app_cluster(address: Json, connect_timeout: str, buffer_limit_bytes: int) -> Json:
    """The replica's own gRPC endpoint at `address` (its Unix socket), over HTTP/2."""
    endpoint = {"endpoint": {"address": address}}
    return {"name": APP_GRPC_CLUSTER, "type": "STATIC", "connect_timeout": connect_timeout,
            "per_connection_buffer_limit_bytes": buffer_limit_bytes,
            "load_assignment": {"cluster_name": APP_GRPC_CLUSTER, "endpoints": [{"lb_endpoints": [endpoint]}]},
            "typed_extension_protocol_options": _http2_upstream()}


def gateway_clusters(rest_clusters: list[Json]) -> list[Json]:
    """The REST clusters to the first stage's versions, as HTTP/2 (ALPN h2 in their mTLS), renamed."""
    clusters = []
    for rest in rest_clusters:
        cluster = copy.deepcopy(rest)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = grpc_cluster_name(rest["name"])
        cluster["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] = ["h2"]
        rest_options = rest.get("typed_extension_protocol_options", {}).get(HTTP_PROTOCOL_OPTIONS, {})
        idle = rest_options.get("common_http_protocol_options", {}).get("idle_timeout")
        cluster["typed_extension_protocol_options"] = upstream_protocol(http2=True, idle_timeout=idle)
        clusters.append(cluster)
    return clusters


def gateway_route_action(rest_action: Json, hop: Hop) -> Json:
    """The REST route's action to the gRPC clusters, retrying on gRPC's retriable status codes."""
    action = copy.deepcopy(rest_action)
    if "cluster" in action:
        action["cluster"] = grpc_cluster_name(action["cluster"])
    else:
        for weighted in action["weighted_clusters"]["clusters"]:
            weighted["name"] = grpc_cluster_name(weighted["name"])
    if "retry_policy" in action:
        policy = action["retry_policy"]
        policy["retry_on"] = ",".join(GRPC_RETRY_ON)
        policy.pop("retriable_status_codes", None)  # HTTP statuses: a gRPC answer is 200 with a grpc-status
    return action


def no_route() -> Json:
    """The gateway's last gRPC route: any other service has none. Envoy answers a gRPC call's 404 as
    UNIMPLEMENTED carrying this text, as an Istio gateway with no matching route does."""
    return {"match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": f"no route here; routed: {GRPC_PATHS}"}}}


def gateway_listener(layout: Layout, hop: Hop, hcm: Json) -> Json:
    assert layout.gateway_grpc_port is not None
    return {"name": GATEWAY_GRPC,
            "address": {"socket_address": {"address": LOOPBACK, "port_value": layout.gateway_grpc_port}},
            "per_connection_buffer_limit_bytes": hop.upstream.buffer_limit_bytes,
            "filter_chains": [{"filters": [hcm]}]}
