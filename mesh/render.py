"""Render a pipeline and its `mesh.yaml` to a kustomize tree of Kubernetes and Istio resources.

Every value comes from the manifest (names, tensors) and the `ResolvedPolicy` (replicas, versions and
weights, timeouts, retries, outlier detection, connection pool, buffer limits, threads, resources,
autoscaling, namespace, gateway host, tracing); nothing is re-derived here. The output is a mapping of
relative path to text, deterministic (sorted keys, stable file order, no timestamps), written by
`write_tree`.

Layout (one resource per file, `<kind>-<target>-<variant>.yaml` for networking files):

    base/                 Namespace, and per stage ServiceAccount, Service, Deployment(s), PodDisruptionBudget;
                          the Grafana dashboard as a ConfigMap (configMapGenerator over its JSON)
    components/istio/     kind: Component, so an overlay may leave Istio out: Gateway, VirtualServices,
                          DestinationRules, PeerAuthentication, AuthorizationPolicies, Telemetry, EnvoyFilters
    overlays/dev          one replica per Deployment, CPU
    overlays/prod         the policy's autoscale.min_replicas, one HorizontalPodAutoscaler per stage
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
from mesh.policy import ENVOY_DEFAULT_BUFFER, Policy, ResolvedPolicy, ResolvedStage, StagePolicy, Version, resolve
from model_export.manifest import MANIFEST_FILE, Manifest

IMAGE = "meshpipe/stage-service"
IMAGE_TAG = "0.1.0"
GPU_IMAGE_TAG = "0.1.0-gpu"
MODEL_INIT_IMAGE_REPO = "meshpipe"  # the model image is <repo>/<pipeline>-model:<sha12 of the source model>
PORT = 8080
RUN_AS = 10001  # any non-root UID but Istio's proxy UID 1337
MODEL_DIR = "/models"
INGRESS_GATEWAY_SELECTOR = {"istio": "ingressgateway"}
INGRESS_GATEWAY_PORT = 80  # the stock istio-ingressgateway Service's HTTP port
INGRESS_GATEWAY_TARGET_PORT = 8080  # ...and the gateway pod's listener behind it
TRACING_PROVIDER = "jaeger"  # meshConfig.extensionProviders name the README installs
DEFAULT_CANARY_WEIGHT = 10
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


def namespace_obj(resolved: ResolvedPolicy) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _meta(resolved.namespace, None, {"istio-injection": "enabled"})}


def service_account(stage: ResolvedStage, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(stage.name, ns, {"app": stage.name}),
            "automountServiceAccountToken": False}


def service(stage: ResolvedStage, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(stage.name, ns, {"app": stage.name, "service": stage.name}),
        "spec": {
            "selector": {"app": stage.name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP",
                       "appProtocol": "http"}],
        },
    }


def pod_disruption_budget(stage: ResolvedStage, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(stage.name, ns, {"app": stage.name}),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": stage.name}}},
    }


def _env(manifest: Manifest, resolved: ResolvedPolicy, stage: ResolvedStage, version: Version) -> list[dict[str, str]]:
    env = {
        "STAGE_MANIFEST": f"{MODEL_DIR}/{MANIFEST_FILE}",
        "STAGE_NAME": stage.name,
        "STAGE_HOST": "0.0.0.0",
        "STAGE_PORT": str(PORT),
        "STAGE_THREADS": str(stage.threads),
        "STAGE_PROVIDERS": "cpu",
        "STAGE_VERSION": version.name,
        "OMP_NUM_THREADS": str(stage.threads),
    }
    if stage.index + 1 < len(resolved.stages):
        nxt = resolved.stages[stage.index + 1]
        env["STAGE_NEXT_URL"] = f"http://{fqdn(nxt.name, resolved.namespace)}:{PORT}"
        env["STAGE_TIMEOUT_S"] = f"{nxt.timeout_s:g}"
    if version.file is not None:
        env["STAGE_FILE"] = f"{MODEL_DIR}/{version.file}"
    if resolved.tracing.otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = resolved.tracing.otlp_endpoint
    del manifest
    return [{"name": k, "value": env[k]} for k in sorted(env)]


def deployment(manifest: Manifest, resolved: ResolvedPolicy, stage: ResolvedStage, version: Version,
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
                    },
                },
                "spec": {
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
                        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                        "env": _env(manifest, resolved, stage, version),
                        "startupProbe": probe("/v2/health/live", 2, 60),
                        "livenessProbe": probe("/v2/health/live", 10, 3),
                        "readinessProbe": probe("/v2/health/ready", 5, 3),
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


def route(stage: ResolvedStage, ns: str) -> list[dict[str, Any]]:
    return [{"destination": {"host": fqdn(stage.name, ns), "subset": v.name, "port": {"number": PORT}},
             "weight": v.weight} for v in stage.versions]


def _http_route(stage: ResolvedStage, ns: str, name: str, match: list[dict[str, Any]] | None) -> dict[str, Any]:
    http: dict[str, Any] = {"name": name}
    if match:
        http["match"] = match
    http["route"] = route(stage, ns)
    http["timeout"] = duration(stage.timeout_s)
    if stage.retries.attempts > 0:
        http["retries"] = {"attempts": stage.retries.attempts, "perTryTimeout": duration(stage.per_try_timeout_s),
                           "retryOn": ",".join(stage.retries.retry_on)}
    else:
        http["retries"] = {"attempts": 0}
    return http


def virtual_service(stage: ResolvedStage, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta(stage.name, ns),
        "spec": {"hosts": [fqdn(stage.name, ns)], "http": [_http_route(stage, ns, "chain", None)]},
    }


def destination_rule(stage: ResolvedStage, ns: str) -> dict[str, Any]:
    od, cp = stage.outlier_detection, stage.connection_pool
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _meta(stage.name, ns),
        "spec": {
            "host": fqdn(stage.name, ns),
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL"},
                "connectionPool": {
                    "tcp": {"maxConnections": cp.max_connections},
                    "http": {"http1MaxPendingRequests": cp.max_pending_requests,
                             "http2MaxRequests": cp.max_requests},
                },
                "outlierDetection": {
                    "consecutive5xxErrors": od.consecutive_5xx,
                    "interval": duration(od.interval_s),
                    "baseEjectionTime": duration(od.base_ejection_time_s),
                    "maxEjectionPercent": od.max_ejection_percent,
                },
            },
            "subsets": [{"name": v.name, "labels": {"version": v.name}} for v in stage.versions],
        },
    }


def gateway(manifest: Manifest, resolved: ResolvedPolicy) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": _meta(manifest.name, resolved.namespace),
        "spec": {
            "selector": dict(INGRESS_GATEWAY_SELECTOR),
            "servers": [{"port": {"number": INGRESS_GATEWAY_PORT, "name": "http", "protocol": "HTTP"},
                         "hosts": [resolved.gateway.host]}],
        },
    }


def gateway_virtual_service(manifest: Manifest, resolved: ResolvedPolicy) -> dict[str, Any]:
    """The pipeline's host at the gateway: `/v2/...` to the first stage, which answers for the pipeline."""
    first = resolved.stages[0]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta(f"{manifest.name}-gateway", resolved.namespace),
        "spec": {
            "hosts": [resolved.gateway.host],
            "gateways": [manifest.name],
            "http": [_http_route(first, resolved.namespace, "pipeline", [{"uri": {"prefix": "/v2"}}])],
        },
    }


def peer_authentication(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": _meta("default", ns), "spec": {"mtls": {"mode": "STRICT"}}}


def allow_nothing(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _meta("allow-nothing", ns), "spec": {}}


def allow_caller(resolved: ResolvedPolicy, stage: ResolvedStage) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _meta(f"{stage.name}-allow-caller", resolved.namespace),
        "spec": {
            "selector": {"matchLabels": {"app": stage.name}},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {"principals": [resolved.caller_principal(stage.name)]}}],
                "to": [{"operation": {"ports": [str(PORT)], "paths": ["/v2", "/v2/*"]}}],
            }],
        },
    }


def telemetry(manifest: Manifest, resolved: ResolvedPolicy) -> dict[str, Any]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": _meta(f"{manifest.name}-tracing", resolved.namespace),
        "spec": {"tracing": [{"providers": [{"name": TRACING_PROVIDER}],
                              "randomSamplingPercentage": resolved.tracing.sampling_percent}]},
    }


def needs_buffer_filter(stage: ResolvedStage) -> bool:
    return stage.retries.attempts > 0 and stage.buffer_limit_bytes > ENVOY_DEFAULT_BUFFER


def buffer_filter(resolved: ResolvedPolicy, stage: ResolvedStage) -> dict[str, Any]:
    """Raise Envoy's buffer limit on the caller's side of the hop into `stage`, where retries buffer bodies.

    The caller is the previous stage's sidecar (or, for the first stage, the ingress gateway, whose
    EnvoyFilter must live in the gateway's namespace). The listener that receives the body and the cluster
    that sends it both get `per_connection_buffer_limit_bytes`: Envoy keeps a body for a retry only while
    it fits the listener's limit (otherwise 507/failed retry), and the router caps it by both.
    """
    limit = stage.buffer_limit_bytes
    if stage.index == 0:
        context, ns, selector = "GATEWAY", resolved.gateway.namespace, dict(INGRESS_GATEWAY_SELECTOR)
        listener_port = INGRESS_GATEWAY_TARGET_PORT
    else:
        context, ns = "SIDECAR_OUTBOUND", resolved.namespace
        selector = {"app": resolved.stages[stage.index - 1].name}
        listener_port = PORT
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": _meta(f"{stage.name}-buffer-limit", ns),
        "spec": {
            "workloadSelector": {"labels": selector},
            "configPatches": [
                {"applyTo": "LISTENER",
                 "match": {"context": context, "listener": {"portNumber": listener_port}},
                 "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": limit}}},
                {"applyTo": "CLUSTER",
                 "match": {"context": context,
                           "cluster": {"service": fqdn(stage.name, resolved.namespace), "portNumber": PORT}},
                 "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": limit}}},
            ],
        },
    }


def hpa(stage: ResolvedStage, ns: str, deployment_name: str) -> dict[str, Any]:
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


def render_tree(manifest: Manifest, policy: Policy) -> dict[str, str]:
    """Every file of the kustomize tree, by path relative to its root."""
    resolved = resolve(stable_policy(policy), manifest)
    canary = resolve(canary_policy(policy, manifest), manifest)
    ns = resolved.namespace
    files: dict[str, str] = {}

    # base
    base: dict[str, dict[str, Any]] = {_file("Namespace", ns): namespace_obj(resolved)}
    for s in resolved.stages:
        base[_file("ServiceAccount", s.name)] = service_account(s, ns)
        base[_file("Service", s.name)] = service(s, ns)
        base[_file("PodDisruptionBudget", s.name)] = pod_disruption_budget(s, ns)
        for v in s.versions:
            base[_file("Deployment", f"{s.name}-{v.name}")] = deployment(manifest, resolved, s, v, s.replicas)
    dashboard_file = f"grafana-dashboard-{manifest.name}.json"
    files[f"base/{dashboard_file}"] = dashboard_json(manifest.name, resolved)
    files["base/kustomization.yaml"] = _kustomization(
        "Kustomization",
        labels=[{"pairs": {"app.kubernetes.io/part-of": manifest.name}}],
        resources=sorted(base),
        configMapGenerator=[{
            "name": f"{manifest.name}-grafana-dashboard",
            "namespace": ns,
            "files": [dashboard_file],
            "options": {"disableNameSuffixHash": True, "labels": {"grafana_dashboard": "1"}},
        }],
    )
    files.update({f"base/{k}": _dump(v) for k, v in base.items()})

    # components/istio
    istio: dict[str, dict[str, Any]] = {
        _file("Gateway", manifest.name, "http"): gateway(manifest, resolved),
        _file("VirtualService", manifest.name, "gateway"): gateway_virtual_service(manifest, resolved),
        _file("PeerAuthentication", "default", "strict"): peer_authentication(ns),
        _file("AuthorizationPolicy", ns, "allow-nothing"): allow_nothing(ns),
        _file("Telemetry", manifest.name, "tracing"): telemetry(manifest, resolved),
    }
    for s in resolved.stages:
        istio[_file("DestinationRule", s.name, "mtls")] = destination_rule(s, ns)
        istio[_file("VirtualService", s.name, "chain")] = virtual_service(s, ns)
        istio[_file("AuthorizationPolicy", s.name, "allow-caller")] = allow_caller(resolved, s)
        if needs_buffer_filter(s):
            istio[_file("EnvoyFilter", s.name, "buffer-limit")] = buffer_filter(resolved, s)
    files["components/istio/kustomization.yaml"] = _kustomization("Component", resources=sorted(istio))
    files.update({f"components/istio/{k}": _dump(v) for k, v in istio.items()})

    deployments = [(s, f"{s.name}-{v.name}") for s in resolved.stages for v in s.versions]

    # overlays/dev: one replica each
    files["overlays/dev/kustomization.yaml"] = _kustomization(
        "Kustomization", resources=["../../base"], components=["../../components/istio"],
        replicas=[{"name": d, "count": 1} for _, d in deployments])

    # overlays/prod: the autoscaler's floor as replicas, and one HPA per stage
    prod = {_file("HorizontalPodAutoscaler", d): hpa(s, ns, d) for s, d in deployments}
    files["overlays/prod/kustomization.yaml"] = _kustomization(
        "Kustomization", resources=["../../base", *sorted(prod)], components=["../../components/istio"],
        replicas=[{"name": d, "count": s.autoscale.min_replicas} for s, d in deployments])
    files.update({f"overlays/prod/{k}": _dump(v) for k, v in prod.items()})

    # overlays/gpu: the GPU image, CUDA first, one GPU per pod
    gpu_patch = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "any-stage"},
        "spec": {"template": {"spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "stage",
                            "env": [{"name": "STAGE_PROVIDERS", "value": "cuda,cpu"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        }}},
    }
    files["overlays/gpu/patch-deployment-gpu.yaml"] = _dump(gpu_patch)
    files["overlays/gpu/kustomization.yaml"] = _kustomization(
        "Kustomization", resources=["../../base"], components=["../../components/istio"],
        images=[{"name": IMAGE, "newTag": GPU_IMAGE_TAG}],
        patches=[{"path": "patch-deployment-gpu.yaml", "target": {"kind": "Deployment"}}])

    # overlays/canary: the canary versions' Deployments, their subsets and the weights
    canary_res: dict[str, dict[str, Any]] = {}
    canary_patches: list[dict[str, Any]] = []
    for s in canary.stages:
        stable = resolved.stage(s.name)
        if [v.name for v in s.versions] == [v.name for v in stable.versions] and s.versions == stable.versions:
            continue
        known = {v.name for v in stable.versions}
        for v in s.versions:
            if v.name not in known:
                canary_res[_file("Deployment", f"{s.name}-{v.name}")] = deployment(manifest, canary, s, v, 1)
        subset_ops = [{"op": "add", "path": "/spec/subsets/-", "value": {"name": v.name, "labels": {"version": v.name}}}
                      for v in s.versions if v.name not in known]
        route_op = [{"op": "replace", "path": "/spec/http/0/route", "value": route(s, ns)}]
        dr_patch, vs_patch = f"patch-destinationrule-{s.name}.yaml", f"patch-virtualservice-{s.name}.yaml"
        files[f"overlays/canary/{dr_patch}"] = _dump(subset_ops)
        files[f"overlays/canary/{vs_patch}"] = _dump(route_op)
        canary_patches.append({"path": dr_patch, "target": {"group": "networking.istio.io", "version": "v1",
                                                            "kind": "DestinationRule", "name": s.name}})
        canary_patches.append({"path": vs_patch, "target": {"group": "networking.istio.io", "version": "v1",
                                                            "kind": "VirtualService", "name": s.name}})
        if s.index == 0:
            canary_patches.append({"path": vs_patch, "target": {
                "group": "networking.istio.io", "version": "v1", "kind": "VirtualService",
                "name": f"{manifest.name}-gateway"}})
    files["overlays/canary/kustomization.yaml"] = _kustomization(
        "Kustomization", resources=["../../base", *sorted(canary_res)], components=["../../components/istio"],
        patches=canary_patches)
    files.update({f"overlays/canary/{k}": _dump(v) for k, v in canary_res.items()})
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
