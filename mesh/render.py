"""Render a pipeline and its `mesh.yaml` to a kustomize tree of Kubernetes and Istio resources.

A writer of the plan of hops (`mesh.plan`): every value comes from the manifest (names, tensors) and the
`Plan` (per hop the route, the upstream and the authorization; per stage replicas, versions, threads,
resources, autoscaling and each replica's `StageSettings`); nothing is re-derived here. The output is a mapping of
relative path to text, deterministic (sorted keys, stable file order, no timestamps), written by
`write_tree`.

Layout (one resource per file, `<kind>-<target>-<variant>.yaml` for networking files):

    base/                 Namespace, and per stage ServiceAccount, Service, Deployment(s), PodDisruptionBudget;
                          the Grafana dashboard as a ConfigMap (configMapGenerator over its JSON)
    components/istio/     kind: Component, so an overlay may leave Istio out: Gateway (HTTPS), VirtualServices,
                          DestinationRules, PeerAuthentication, AuthorizationPolicies, RequestAuthentication,
                          Telemetry, EnvoyFilters
    overlays/dev          one replica per Deployment, CPU
    overlays/prod         one HorizontalPodAutoscaler per Deployment, which alone sets its replicas
    overlays/gpu          the GPU image, CUDA first, nvidia.com/gpu limits and toleration
    overlays/canary       a second version of one stage at a weight (from the policy where it names one)

Versions beyond the first that the policy gives a stage are its canary: base carries each stage's first
version at weight 100 and the canary overlay adds the others at the policy's weights. Where the policy
names no second version, the canary overlay rolls the last stage to the next version at 10%, and that
policy goes through `resolve` like any other, so it obeys the same checks.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from mesh.dashboard import dashboard_json
from mesh.envoy_config import client_limits
from mesh.plan import ENVOY_DEFAULT_BUFFER, GATEWAY, GATEWAY_SETS, Hop, Placement, Plan, StagePlan, resolve
from mesh.policy import Fault, Policy, StagePolicy, Version
from model_export.manifest import MANIFEST_FILE, Manifest, load_manifest
from stage_service.settings import StageSettings

IMAGE = "meshpipe/stage-service"
IMAGE_TAG = "0.1.0"
GPU_IMAGE_TAG = "0.1.0-gpu"
MODEL_INIT_IMAGE_REPO = "meshpipe"  # the model image is <repo>/<pipeline>-model:<sha12 of the source model>
PORT = 8080
# KServe v2 gRPC (STAGE_GRPC_PORT), KServe's own default port: on the first stage only, the one clients reach
# (through the gateway); the others chain over REST and are spared its ~13 MB of imports.
GRPC_PORT = 8081
GRPC_PREFIX = "/inference.GRPCInferenceService/"
# Istio's retryOn for gRPC: the status codes that mean "another replica may answer", and connection failures;
# never invalid-argument or resource-exhausted, which would only fail again.
GRPC_RETRY_ON = "unavailable,cancelled,connect-failure,refused-stream,reset"
GATEWAY_GRPC_ROUTE = "/spec/http/1"  # the gateway VirtualService's gRPC route
RUN_AS = 10001  # any non-root UID but Istio's proxy UID 1337
MODEL_DIR = "/models"
INGRESS_GATEWAY_SELECTOR = {"istio": "ingressgateway"}
INGRESS_GATEWAY_PORT = 443  # the stock istio-ingressgateway Service's HTTPS port
INGRESS_GATEWAY_TARGET_PORT = 8443  # ...and the gateway pod's listener behind it
TRACING_PROVIDER = "jaeger"  # meshConfig.extensionProviders name the README installs
DEFAULT_CANARY_WEIGHT = 10
# Drain: after a pod is marked for deletion, the endpoint controller and istiod take it out of every
# caller's load balancing within seconds; the preStop sleep keeps the app serving until they have, then
# SIGTERM makes it stop listening and finish what is in flight (STAGE_TIMEOUT_S + 5 s at most).
PRESTOP_SLEEP_S = 5
DRAIN_MARGIN_S = 5
MANAGED_DIRS = ("base", "components", "overlays")
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
COMPONENT_API = "kustomize.config.k8s.io/v1alpha1"


class RenderError(ValueError):
    """The pipeline or policy cannot be rendered."""


def _dump(obj: dict[str, Any] | list[Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, width=120)


def duration(seconds: float) -> str:
    """Protobuf-JSON duration (what Istio's CRDs store): `15s`, `0.25s`, never exponent notation."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    if text in {"", "0"}:
        raise RenderError(f"duration {seconds}s rounds to zero at millisecond precision")
    return f"{text}s"


def fqdn(stage: str, namespace: str) -> str:
    return f"{stage}.{namespace}.svc.cluster.local"


def model_image(manifest: Manifest) -> str:
    """The small image holding pipeline.json and the stage files, tagged by the source model's digest."""
    return f"{MODEL_INIT_IMAGE_REPO}/{manifest.name}-model:{manifest.source_model.sha256[:12]}"


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


# ---------------------------------------------------------------------------------------------- base


def namespace_obj(resolved: Plan) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _meta(resolved.namespace, None, {"istio-injection": "enabled"})}


def service_account(stage: StagePlan, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(stage.name, ns, {"app": stage.name}),
            "automountServiceAccountToken": False}


def service(stage: StagePlan, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(stage.name, ns, {"app": stage.name, "service": stage.name}),
        "spec": {
            "selector": {"app": stage.name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}]
            + ([{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"}] if stage.index == 0 else []),
        },
    }


def pod_disruption_budget(stage: StagePlan, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(stage.name, ns, {"app": stage.name}),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": stage.name}}},
    }


def _env(resolved: Plan, stage: StagePlan, version: Version) -> list[dict[str, str]]:
    nxt = resolved.hop_from(stage.name)
    placement = Placement(manifest=f"{MODEL_DIR}/{MANIFEST_FILE}", model_dir=Path(MODEL_DIR), host="0.0.0.0",
                          port=PORT, next_url=f"http://{fqdn(nxt.callee, resolved.namespace)}:{PORT}" if nxt else None,
                          grpc_port=GRPC_PORT if stage.index == 0 else None)
    env = resolved.settings(stage, version, placement, providers="cpu").to_env()
    env["OMP_NUM_THREADS"] = str(stage.threads)
    if resolved.tracing.otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = resolved.tracing.otlp_endpoint
    return [{"name": k, "value": env[k]} for k in sorted(env)]


def _app_drain_s(stage: StagePlan) -> int:
    """How long the app may take to finish its in-flight requests after SIGTERM (stage_service.__main__)."""
    timeout = stage.next_timeout_s or StageSettings.model_fields["timeout_s"].default
    return int(timeout) + 5


def _grace_s(stage: StagePlan) -> int:
    """terminationGracePeriodSeconds: the preStop wait, the app's drain and a margin, so nothing is killed."""
    return PRESTOP_SLEEP_S + _app_drain_s(stage) + DRAIN_MARGIN_S


def _proxy_config(stage: StagePlan) -> str:
    """The sidecar's shutdown (Istio's ProxyConfig): it keeps serving while connections are open, up to the
    app's drain, and exits as soon as none is left (EXIT_ON_ZERO_ACTIVE_CONNECTIONS)."""
    return _dump({"terminationDrainDuration": f"{PRESTOP_SLEEP_S + _app_drain_s(stage)}s",
                  "proxyMetadata": {"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true"}})


def deployment(manifest: Manifest, resolved: Plan, stage: StagePlan, version: Version,
               replicas: int) -> dict[str, Any]:
    """`<stage>-<version>`: non-root, read-only root, probes, model files copied in by an init container."""
    labels = {"app": stage.name, "version": version.name}
    drop_all = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}}
    resources = {"cpu": f"{stage.cpu_millicores}m", "memory": f"{stage.memory_mib}Mi"}

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2,
                "failureThreshold": failures}

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"{stage.name}-{version.name}", resolved.namespace, labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                        "proxy.istio.io/config": _proxy_config(stage),
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": _grace_s(stage),
                    "serviceAccountName": stage.name,
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                        "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [{
                        "name": "model",
                        "image": model_image(manifest),
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["cp", "-R", "/pipeline/.", MODEL_DIR],
                        "securityContext": drop_all,
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"cpu": "500m", "memory": "128Mi"}},
                        "volumeMounts": [{"name": "models", "mountPath": MODEL_DIR}],
                    }],
                    "containers": [{
                        "name": "stage",
                        "image": f"{IMAGE}:{IMAGE_TAG}",
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
                        + ([{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}]
                           if stage.index == 0 else []),
                        "env": _env(resolved, stage, version),
                        "startupProbe": probe("/v2/health/live", 2, 60),
                        "livenessProbe": probe("/v2/health/live", 10, 3),
                        "readinessProbe": probe("/v2/health/ready", 5, 3),
                        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
                        "resources": {"requests": dict(resources), "limits": dict(resources)},
                        "securityContext": drop_all,
                        "volumeMounts": [{"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
                                         {"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


# --------------------------------------------------------------------------------------------- istio


def route(hop: Hop, ns: str) -> list[dict[str, Any]]:
    return [{"destination": {"host": fqdn(hop.callee, ns), "subset": d.version, "port": {"number": PORT}},
             "weight": d.weight} for d in hop.route.destinations]


def grpc_route(hop: Hop, ns: str) -> list[dict[str, Any]]:
    """`route`, to the Services' gRPC port."""
    destinations = route(hop, ns)
    for d in destinations:
        d["destination"]["port"] = {"number": GRPC_PORT}
    return destinations


def _percentage(value: float) -> dict[str, float]:
    return {"value": value}


def _fault(fault: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if fault.delay is not None:
        out["delay"] = {"fixedDelay": duration(fault.delay.fixed_delay_s),
                        "percentage": _percentage(fault.delay.percent)}
    if fault.abort is not None:
        out["abort"] = {"httpStatus": fault.abort.http_status, "percentage": _percentage(fault.abort.percent)}
    return out


def _http_route(hop: Hop, ns: str, name: str, match: list[dict[str, Any]] | None) -> dict[str, Any]:
    http: dict[str, Any] = {"name": name}
    if match:
        http["match"] = match
    http["route"] = route(hop, ns)
    http["timeout"] = duration(hop.route.timeout_s)
    if hop.route.attempts > 0:
        http["retries"] = {"attempts": hop.route.attempts, "perTryTimeout": duration(hop.route.per_try_timeout_s),
                           "retryOn": hop.route.istio_retry_on}
    else:
        http["retries"] = {"attempts": 0}
    if hop.route.fault is not None:
        http["fault"] = _fault(hop.route.fault)
    return http


def virtual_service(hop: Hop, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta(hop.callee, ns),
        "spec": {"hosts": [fqdn(hop.callee, ns)], "http": [_http_route(hop, ns, "chain", None)]},
    }


def _outlier_detection(hop: Hop) -> dict[str, Any]:
    od = hop.upstream.outlier_detection
    out: dict[str, Any] = {
        "consecutive5xxErrors": od.consecutive_5xx,
        "consecutiveGatewayErrors": od.consecutive_gateway_errors,
        "interval": duration(od.interval_s),
        "baseEjectionTime": duration(od.base_ejection_time_s),
        "maxEjectionPercent": od.max_ejection_percent,
    }
    if od.split_external_local_origin_errors:
        out["splitExternalLocalOriginErrors"] = True
        out["consecutiveLocalOriginFailures"] = od.consecutive_local_origin_failures
    return out


def _retry_budget(hop: Hop) -> dict[str, Any]:
    budget = hop.upstream.retry_budget
    if budget is None:
        return {}
    return {"retryBudget": {"percent": budget.percent, "minRetryConcurrency": budget.min_retry_concurrency}}


def destination_rule(hop: Hop, ns: str) -> dict[str, Any]:
    cp = hop.upstream.connection_pool
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _meta(hop.callee, ns),
        "spec": {
            "host": fqdn(hop.callee, ns),
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL"},
                "connectionPool": {
                    "tcp": {"maxConnections": cp.max_connections, "connectTimeout": duration(cp.connect_timeout_s)},
                    "http": {"http1MaxPendingRequests": cp.max_pending_requests,
                             "http2MaxRequests": cp.max_requests, "maxRetries": cp.max_retries,
                             "idleTimeout": duration(cp.idle_timeout_s)},
                },
                "outlierDetection": _outlier_detection(hop),
                **_retry_budget(hop),
            },
            "subsets": [{"name": v, "labels": {"version": v}} for v in hop.upstream.subsets],
        },
    }


def gateway(manifest: Manifest, resolved: Plan) -> dict[str, Any]:
    """HTTPS only: TLS ends at the ingress gateway with the certificate and key of the Secret `credentialName`
    (in the gateway's namespace; README: "TLS and tokens at the gateway"), REST and gRPC (ALPN h2) alike."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": _meta(manifest.name, resolved.namespace),
        "spec": {
            "selector": dict(INGRESS_GATEWAY_SELECTOR),
            "servers": [{"port": {"number": INGRESS_GATEWAY_PORT, "name": "https", "protocol": "HTTPS"},
                         "tls": {"mode": "SIMPLE", "credentialName": resolved.gateway.tls.credential_name},
                         "hosts": [resolved.gateway.host]}],
        },
    }


def request_authentication(manifest: Manifest, resolved: Plan) -> dict[str, Any]:
    """The tokens the ingress gateway checks (Istio's RequestAuthentication): a token that is present must be
    valid for the policy's issuer and audiences (else 401); whether one must be present is the
    AuthorizationPolicy's part (`require_token`)."""
    auth = resolved.gateway.auth
    rule: dict[str, Any] = {"issuer": auth.issuer, "audiences": list(auth.audiences)}
    if auth.jwks is not None:
        rule["jwks"] = auth.jwks
    elif auth.jwks_uri is not None:
        rule["jwksUri"] = auth.jwks_uri
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": _meta(f"{manifest.name}-jwt", resolved.gateway.namespace),
        "spec": {"selector": {"matchLabels": dict(INGRESS_GATEWAY_SELECTOR)}, "jwtRules": [rule]},
    }


def _hosts(host: str) -> list[str]:
    """The pipeline's host as an authorization rule matches the Host header: bare, and with any port."""
    return [host, f"{host}:*"]


def require_token(manifest: Manifest, resolved: Plan) -> dict[str, Any]:
    """A request for the pipeline's model or gRPC paths on its host without a valid token's principal is denied
    at the ingress gateway (403). A DENY rule rather than an ALLOW: an ALLOW policy on the shared ingress gateway
    would deny every other host behind it; health stays open, as the gateway's own probes are. The rule names the
    gateway pod's HTTPS port, so it cannot catch TCP traffic on other ports (istioctl's advice for DENY rules)."""
    paths = [p for p in resolved.gateway_paths if not p.startswith("/v2/health/")] + [f"{GRPC_PREFIX}*"]
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _meta(f"{manifest.name}-require-token", resolved.gateway.namespace),
        "spec": {
            "selector": {"matchLabels": dict(INGRESS_GATEWAY_SELECTOR)},
            "action": "DENY",
            "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}],
                       "to": [{"operation": {"ports": [str(INGRESS_GATEWAY_TARGET_PORT)],
                                             "hosts": _hosts(resolved.gateway.host), "paths": paths}}]}],
        },
    }


def _uri_match(path: str) -> dict[str, Any]:
    """A plan path (`/x/*` a prefix `/x/`, anything else exact) as a VirtualService match."""
    if path.endswith("/*"):
        return {"uri": {"prefix": path.removesuffix("*")}}
    return {"uri": {"exact": path}}


def gateway_virtual_service(manifest: Manifest, resolved: Plan) -> dict[str, Any]:
    """The pipeline's host at the gateway: the pipeline's model and health paths to the first stage, which
    answers for the pipeline; no route (404 from the gateway) for `/metrics` or any stage's own model."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta(f"{manifest.name}-gateway", resolved.namespace),
        "spec": {
            "hosts": [resolved.gateway.host],
            "gateways": [manifest.name],
            # REST first: the overlays' patches of a hop's route (/spec/http/0) hold for the stage's own
            # VirtualService and this one; the gRPC route (GATEWAY_GRPC_ROUTE) gets its own ops.
            "http": gateway_sets([_http_route(resolved.hops[0], resolved.namespace, "pipeline",
                                              [_uri_match(p) for p in resolved.gateway_paths]),
                                  _grpc_route(resolved.hops[0], resolved.namespace)]),
        },
    }


def gateway_sets(http: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`http` with every route that forwards setting GATEWAY_SETS, over any value a client sent."""
    for route in http:
        if "route" in route:
            route["headers"] = {"request": {"set": dict(GATEWAY_SETS)}}
    return http


def _grpc_route(hop: Hop, ns: str) -> dict[str, Any]:
    """KServe v2 gRPC to the first stage's `grpc` port: the REST route's versions and timeout, retried on
    gRPC status codes (a gRPC error is HTTP 200 with a grpc-status, which 5xx conditions never see)."""
    http = _http_route(hop, ns, "pipeline-grpc", [{"uri": {"prefix": GRPC_PREFIX}}])
    http["route"] = grpc_route(hop, ns)
    if hop.route.attempts > 0:
        http["retries"]["retryOn"] = GRPC_RETRY_ON
    http.pop("fault", None)  # the policy's faults are HTTP statuses
    return http


def peer_authentication(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": _meta("default", ns), "spec": {"mtls": {"mode": "STRICT"}}}


def allow_nothing(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _meta("allow-nothing", ns), "spec": {}}


def allow_caller(hop: Hop, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _meta(f"{hop.callee}-allow-caller", ns),
        "spec": {
            "selector": {"matchLabels": {"app": hop.callee}},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": list(hop.allowed_principals)}}],
                "to": [{"operation": {"ports": [str(PORT)] + ([str(GRPC_PORT)] if hop.caller == GATEWAY else []),
                                      "paths": list(hop.allowed_paths)}}],
                **({"when": [{"key": f"request.headers[{name}]", "values": [value]}
                             for name, value in hop.required_headers.items()]} if hop.required_headers else {}),
            }],
        },
    }


def telemetry(manifest: Manifest, resolved: Plan) -> dict[str, Any]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": _meta(f"{manifest.name}-tracing", resolved.namespace),
        "spec": {"tracing": [{"providers": [{"name": TRACING_PROVIDER}],
                              "randomSamplingPercentage": resolved.tracing.sampling_percent}]},
    }


def needs_buffer_filter(hop: Hop) -> bool:
    return hop.route.attempts > 0 and hop.upstream.buffer_limit_bytes > ENVOY_DEFAULT_BUFFER


def buffer_filter(resolved: Plan, hop: Hop) -> dict[str, Any]:
    """Raise Envoy's buffer limit on the caller's side of `hop`, where retries buffer bodies.

    The caller is the previous stage's sidecar (or, for the first stage, the ingress gateway, whose
    EnvoyFilter must live in the gateway's namespace). The listener that receives the body and the cluster
    that sends it both get `per_connection_buffer_limit_bytes`: Envoy keeps a body for a retry only while
    it fits the listener's limit (otherwise 507/failed retry), and the router caps it by both.
    """
    limit = hop.upstream.buffer_limit_bytes
    if hop.caller == GATEWAY:
        context, ns, selector = "GATEWAY", resolved.gateway.namespace, dict(INGRESS_GATEWAY_SELECTOR)
        listener_port = INGRESS_GATEWAY_TARGET_PORT
    else:
        context, ns = "SIDECAR_OUTBOUND", resolved.namespace
        selector = {"app": hop.caller}
        listener_port = PORT
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": _meta(f"{hop.callee}-buffer-limit", ns),
        "spec": {
            "workloadSelector": {"labels": selector},
            "configPatches": [
                {"applyTo": "LISTENER",
                 "match": {"context": context, "listener": {"portNumber": listener_port}},
                 "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": limit}}},
                {"applyTo": "CLUSTER",
                 "match": {"context": context,
                           "cluster": {"service": fqdn(hop.callee, resolved.namespace), "portNumber": PORT}},
                 "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": limit}}},
            ],
        },
    }


HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _client_limits_patch(resolved: Plan, context: str) -> dict[str, Any]:
    return {"applyTo": "NETWORK_FILTER",
            "match": {"context": context, "listener": {"filterChain": {"filter": {"name": HCM}}}},
            "patch": {"operation": "MERGE",
                      "value": {"name": HCM, "typed_config": {"@type": HCM_TYPE,
                                                              **client_limits(resolved.clients)}}}}


def client_limits_filters(manifest: Manifest, resolved: Plan) -> dict[str, dict[str, Any]]:
    """mesh.yaml's `clients` bounds on the ingress gateway's and every sidecar's inbound connection manager:
    Istio's resources have no field for them, so an EnvoyFilter merges into each connection manager the same
    fields the local mesh's Envoys are written with."""
    def envoy_filter(name: str, ns: str, context: str, selector: dict[str, str] | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"configPatches": [_client_limits_patch(resolved, context)]}
        if selector is not None:
            spec = {"workloadSelector": {"labels": selector}, **spec}
        return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                "metadata": _meta(name, ns), "spec": spec}

    return {
        "gateway": envoy_filter(f"{manifest.name}-client-limits", resolved.gateway.namespace, "GATEWAY",
                                dict(INGRESS_GATEWAY_SELECTOR)),
        "sidecars": envoy_filter("client-limits", resolved.namespace, "SIDECAR_INBOUND", None),
    }


def hpa(stage: StagePlan, ns: str, deployment_name: str) -> dict[str, Any]:
    a = stage.autoscale
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(deployment_name, ns, {"app": stage.name}),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": a.target_cpu_percent}}}],
        },
    }


# ------------------------------------------------------------------------------------------ policies


def stable_policy(policy: Policy) -> Policy:
    """The policy with every stage at its first version only, weight 100: what base carries."""
    stages = {}
    for name, sp in policy.stages.items():
        if sp.versions is not None and len(sp.versions) > 1:
            first = sp.versions[0]
            sp = sp.model_copy(update={"versions": [Version(name=first.name, weight=100, file=first.file)]})
        stages[name] = sp
    return policy.model_copy(update={"stages": stages})


def _next_version(name: str) -> str:
    m = re.fullmatch(r"v(\d+)", name)
    return f"v{int(m.group(1)) + 1}" if m else f"{name}-canary"[:63]


def canary_policy(policy: Policy, manifest: Manifest) -> Policy:
    """The policy as written when it names a second version somewhere; else the last stage's next version
    at DEFAULT_CANARY_WEIGHT percent."""
    if any(sp.versions is not None and len(sp.versions) > 1 for sp in policy.stages.values()):
        return policy
    last = manifest.stages[-1]
    own = policy.stages.get(last.name, StagePolicy())
    current = own.versions[0] if own.versions else Version(name=last.version, weight=100)
    versions = [Version(name=current.name, weight=100 - DEFAULT_CANARY_WEIGHT, file=current.file),
                Version(name=_next_version(current.name), weight=DEFAULT_CANARY_WEIGHT)]
    stages = dict(policy.stages)
    stages[last.name] = own.model_copy(update={"versions": versions})
    return policy.model_copy(update={"stages": stages})


# ------------------------------------------------------------------------------------------ the tree


def _kustomization(kind: str, **fields: Any) -> str:
    api = COMPONENT_API if kind == "Component" else KUSTOMIZE_API
    return _dump({"apiVersion": api, "kind": kind, **fields})


def _file(kind: str, target: str, variant: str | None = None) -> str:
    parts = [kind.lower(), target] + ([variant] if variant else [])
    return "-".join(parts) + ".yaml"


Files = dict[str, str]
Objects = dict[str, dict[str, Any]]


def _base_objects(manifest: Manifest, resolved: Plan) -> Objects:
    """Namespace, and per stage ServiceAccount, Service, PodDisruptionBudget and one Deployment per version."""
    ns = resolved.namespace
    objs: Objects = {_file("Namespace", ns): namespace_obj(resolved)}
    for s in resolved.stages:
        objs[_file("ServiceAccount", s.name)] = service_account(s, ns)
        objs[_file("Service", s.name)] = service(s, ns)
        objs[_file("PodDisruptionBudget", s.name)] = pod_disruption_budget(s, ns)
        for v in s.versions:
            objs[_file("Deployment", f"{s.name}-{v.name}")] = deployment(manifest, resolved, s, v, s.replicas)
    return objs


def _base(manifest: Manifest, resolved: Plan, objs: Objects) -> Files:
    """base/: `objs`, and the Grafana dashboard as a ConfigMap."""
    ns = resolved.namespace
    dashboard_file = f"grafana-dashboard-{manifest.name}.json"
    files = {
        f"base/{dashboard_file}": dashboard_json(manifest.name, resolved),
        "base/kustomization.yaml": _kustomization(
            "Kustomization",
            labels=[{"pairs": {"app.kubernetes.io/part-of": manifest.name}}],
            resources=sorted(objs),
            configMapGenerator=[{
                "name": f"{manifest.name}-grafana-dashboard",
                "namespace": ns,
                "files": [dashboard_file],
                "options": {"disableNameSuffixHash": True, "labels": {"grafana_dashboard": "1"}},
            }],
        ),
    }
    files.update({f"base/{k}": _dump(v) for k, v in objs.items()})
    return files


def _istio_component(manifest: Manifest, resolved: Plan, pinned: Objects | None = None) -> Files:
    """components/istio: the gateway (HTTPS, and a token required unless mesh.yaml turns auth off), and per hop
    its VirtualService, DestinationRule, AuthorizationPolicy and (where retried bodies outgrow Envoy's default
    buffer) EnvoyFilter; `pinned`: those of every split instead (mesh.render_pinned)."""
    ns = resolved.namespace
    objs: Objects = {
        _file("Gateway", manifest.name, "https"): gateway(manifest, resolved),
        _file("VirtualService", manifest.name, "gateway"): gateway_virtual_service(manifest, resolved),
        _file("PeerAuthentication", "default", "strict"): peer_authentication(ns),
        _file("AuthorizationPolicy", ns, "allow-nothing"): allow_nothing(ns),
        _file("Telemetry", manifest.name, "tracing"): telemetry(manifest, resolved),
    }
    if resolved.gateway.auth.enabled:
        objs[_file("RequestAuthentication", manifest.name, "jwt")] = request_authentication(manifest, resolved)
        objs[_file("AuthorizationPolicy", manifest.name, "require-token")] = require_token(manifest, resolved)
    for variant, obj in client_limits_filters(manifest, resolved).items():
        objs[_file("EnvoyFilter", variant, "client-limits")] = obj
    for hop in resolved.hops if pinned is None else []:
        objs[_file("DestinationRule", hop.callee, "mtls")] = destination_rule(hop, ns)
        objs[_file("VirtualService", hop.callee, "chain")] = virtual_service(hop, ns)
        objs[_file("AuthorizationPolicy", hop.callee, "allow-caller")] = allow_caller(hop, ns)
        if needs_buffer_filter(hop):
            objs[_file("EnvoyFilter", hop.callee, "buffer-limit")] = buffer_filter(resolved, hop)
    objs.update(pinned or {})
    files = {"components/istio/kustomization.yaml": _kustomization("Component", resources=sorted(objs))}
    files.update({f"components/istio/{k}": _dump(v) for k, v in objs.items()})
    return files


Deployments = list[tuple[StagePlan, str]]


def _deployments(resolved: Plan) -> Deployments:
    return [(s, f"{s.name}-{v.name}") for s in resolved.stages for v in s.versions]


def _overlay(name: str, resources: list[str] | None = None, **fields: Any) -> Files:
    return {f"overlays/{name}/kustomization.yaml": _kustomization(
        "Kustomization", resources=["../../base", *(resources or [])], components=["../../components/istio"],
        **fields)}


def _dev_overlay(deployments: Deployments) -> Files:
    """One replica per Deployment."""
    return _overlay("dev", replicas=[{"name": d, "count": 1} for _, d in deployments])


def autoscaled_policy(policy: Policy, stable: Plan) -> Policy:
    """The policy as the prod overlay runs it: every stage at least its autoscaler's minimum replicas."""
    stages = dict(policy.stages)
    for s in stable.stages:
        own = stages.get(s.name, StagePolicy())
        stages[s.name] = own.model_copy(update={"replicas": max(s.replicas, s.autoscale.min_replicas)})
    return policy.model_copy(update={"stages": stages})


def _per_try_patches(manifest: Manifest, stable: Plan, prod: Plan) -> tuple[Files, list[dict[str, Any]]]:
    """Where the autoscaler's replicas give a hop a replica to retry on, its per-try timeout as the plan
    derives it (a VirtualService patch); base keeps the hop's whole timeout, fit for one replica."""
    files: Files = {}
    patches: list[dict[str, Any]] = []
    for old, new in zip(stable.hops, prod.hops, strict=True):
        if new.route.attempts == 0 or new.route.per_try_timeout_s == old.route.per_try_timeout_s:
            continue
        name = f"patch-virtualservice-{new.callee}.yaml"
        op = {"op": "replace", "path": "/spec/http/0/retries/perTryTimeout",
              "value": duration(new.route.per_try_timeout_s)}
        files[f"overlays/prod/{name}"] = _dump([op])
        patches.append({"path": name, "target": _patch_target("VirtualService", new.callee)})
        if new.caller == GATEWAY:
            gateway_vs = f"{manifest.name}-gateway"
            grpc_op = dict(op, path=f"{GATEWAY_GRPC_ROUTE}/retries/perTryTimeout")
            files[f"overlays/prod/patch-virtualservice-{gateway_vs}.yaml"] = _dump([op, grpc_op])
            patches.append({"path": f"patch-virtualservice-{gateway_vs}.yaml",
                            "target": _patch_target("VirtualService", gateway_vs)})
    return files, patches


def _prod_overlay(manifest: Manifest, stable: Plan, prod: Plan | None, deployments: Deployments) -> Files:
    """One HorizontalPodAutoscaler per Deployment, and no `replicas` on the Deployments it scales: a
    `replicas` there would reset the autoscaler's decision on every apply (its minReplicas is the floor).
    With the autoscaler's replicas, hops get the per-try timeouts of `prod`, the plan at those replicas
    (None: the hops' own, as with pinned splits, whose routes are per split)."""
    hpas = {_file("HorizontalPodAutoscaler", d): hpa(s, stable.namespace, d) for s, d in deployments}
    patch = "patch-deployment-no-replicas.yaml"
    per_try_files, per_try_patches = _per_try_patches(manifest, stable, prod) if prod is not None else ({}, [])
    files = _overlay("prod", sorted(hpas),
                     patches=[{"path": patch, "target": {"kind": "Deployment"}}, *per_try_patches])
    files[f"overlays/prod/{patch}"] = _dump([{"op": "remove", "path": "/spec/replicas"}])
    files.update(per_try_files)
    files.update({f"overlays/prod/{k}": _dump(v) for k, v in hpas.items()})
    return files


def _gpu_overlay() -> Files:
    """The GPU image, CUDA first, one GPU per pod."""
    gpu_patch = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "any-stage"},
        "spec": {"template": {"spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "stage",
                            "env": [{"name": "STAGE_PROVIDERS", "value": "cuda,cpu"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        }}},
    }
    files = _overlay("gpu", images=[{"name": IMAGE, "newTag": GPU_IMAGE_TAG}],
                     patches=[{"path": "patch-deployment-gpu.yaml", "target": {"kind": "Deployment"}}])
    files["overlays/gpu/patch-deployment-gpu.yaml"] = _dump(gpu_patch)
    return files


def _patch_target(kind: str, name: str) -> dict[str, str]:
    return {"group": "networking.istio.io", "version": "v1", "kind": kind, "name": name}


def _canary_overlay(manifest: Manifest, stable: Plan, canary: Plan) -> Files:
    """The canary versions' Deployments, their subsets and the weights."""
    files: Files = {}
    objs: Objects = {}
    patches: list[dict[str, Any]] = []
    ns = canary.namespace
    for s, hop in zip(canary.stages, canary.hops, strict=True):
        if s.versions == stable.stage(s.name).versions:
            continue
        known = {v.name for v in stable.stage(s.name).versions}
        for v in s.versions:
            if v.name not in known:
                objs[_file("Deployment", f"{s.name}-{v.name}")] = deployment(manifest, canary, s, v, 1)
        subset_ops = [{"op": "add", "path": "/spec/subsets/-", "value": {"name": v.name, "labels": {"version": v.name}}}
                      for v in s.versions if v.name not in known]
        route_op = [{"op": "replace", "path": "/spec/http/0/route", "value": route(hop, ns)}]
        dr_patch, vs_patch = f"patch-destinationrule-{s.name}.yaml", f"patch-virtualservice-{s.name}.yaml"
        files[f"overlays/canary/{dr_patch}"] = _dump(subset_ops)
        files[f"overlays/canary/{vs_patch}"] = _dump(route_op)
        patches.append({"path": dr_patch, "target": _patch_target("DestinationRule", s.name)})
        patches.append({"path": vs_patch, "target": _patch_target("VirtualService", s.name)})
        if hop.caller == GATEWAY:
            gateway_vs = f"{manifest.name}-gateway"
            grpc_op = {"op": "replace", "path": f"{GATEWAY_GRPC_ROUTE}/route", "value": grpc_route(hop, ns)}
            files[f"overlays/canary/patch-virtualservice-{gateway_vs}.yaml"] = _dump(route_op + [grpc_op])
            patches.append({"path": f"patch-virtualservice-{gateway_vs}.yaml",
                            "target": _patch_target("VirtualService", gateway_vs)})
    files.update(_overlay("canary", sorted(objs), patches=patches))
    files.update({f"overlays/canary/{k}": _dump(v) for k, v in objs.items()})
    return files


def render_tree(manifest: Manifest, policy: Policy, pipeline_dir: Path | None = None,
                policy_dir: Path | None = None) -> dict[str, str]:
    """Every file of the kustomize tree, by path relative to its root. With `splits` in the policy, the tree of
    every split, pinned (`render_pinned`): `pipeline_dir` holds `manifest`, and a split's relative path is
    relative to `policy_dir`."""
    if policy.splits is not None:
        return _pinned_tree(manifest, policy, pipeline_dir, policy_dir)
    stable = resolve(stable_policy(policy), manifest)
    canary = resolve(canary_policy(policy, manifest), manifest)
    prod = resolve(autoscaled_policy(stable_policy(policy), stable), manifest)
    files = {**_base(manifest, stable, _base_objects(manifest, stable)), **_istio_component(manifest, stable),
             **_dev_overlay(_deployments(stable)), **_prod_overlay(manifest, stable, prod, _deployments(stable)),
             **_gpu_overlay(), **_canary_overlay(manifest, stable, canary)}
    return dict(sorted(files.items()))


def _pinned_tree(manifest: Manifest, policy: Policy, pipeline_dir: Path | None, policy_dir: Path | None) -> Files:
    """The tree of every split the policy lists, each request pinned to one (mesh.render_pinned). The split
    rollout is the canary here: the canary overlay adds nothing to base."""
    from mesh import render_pinned
    from mesh.splits import resolve_pinning

    if pipeline_dir is None:
        raise RenderError("the policy lists splits: render needs the pipeline's directory to find them")
    pinning = resolve_pinning(policy, manifest, pipeline_dir, policy_dir)
    assert pinning is not None
    manifests = {s.name: load_manifest(s.pipeline_dir) for s in pinning.splits}
    primary = pinning.splits[0].plan
    deployments = [(st, f"{st.name}-{s.name}-{v.name}") for s in pinning.splits for st in s.plan.stages
                   for v in st.versions]
    files = {**_base(manifest, primary, render_pinned.base(manifests, pinning)),
             **_istio_component(manifest, primary, render_pinned.istio(manifest, pinning)),
             **_dev_overlay(deployments), **_prod_overlay(manifest, primary, None, deployments), **_gpu_overlay(),
             **_overlay("canary")}
    return dict(sorted(files.items()))


def write_tree(files: dict[str, str], out: Path) -> list[Path]:
    """Write the tree under `out`, first removing the directories render owns, so no stale file stays."""
    out.mkdir(parents=True, exist_ok=True)
    for d in MANAGED_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
