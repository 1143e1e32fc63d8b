"""What a cluster would hold beside the applied objects, for judges that run without one.

Istio's offline tools look at Pods and EndpointSlices (analyze checks that selectors match pods; istiod's
generator derives a sidecar's inbound listeners and an upstream's SAN from the pods behind a Service).
Kubernetes makes those from Deployments and Services; here they are derived the same way: one ready Pod
per Deployment replica (its template's labels, service account and containers, a pod IP), and per Service
one EndpointSlice listing the pods it selects. In a namespace labelled `istio-injection: enabled` a pod
also gets the `istio-proxy` container Istio's sidecar injector (a mutating webhook, absent here) would add:
the caller passes that container as Istio's own install renders it. An HTTPS Gateway's TLS Secret, which
the user creates, is made too.
"""

from __future__ import annotations

import base64
import copy
import tempfile
from pathlib import Path
from typing import Any

from mesh import pki

Obj = dict[str, Any]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _injected_namespaces(objects: list[Obj]) -> set[str]:
    return {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"
            and (o["metadata"].get("labels") or {}).get("istio-injection") == "enabled"}


def pods(objects: list[Obj], sidecar: Obj | None = None) -> list[Obj]:
    """One Running, Ready Pod per replica of every Deployment, each with its own IP in 10.1.0.0/16; with
    `sidecar` (an istio-proxy container) added where the namespace asks for injection."""
    out: list[Obj] = []
    injected = _injected_namespaces(objects) if sidecar is not None else set()
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for index, deployment in enumerate(deployments, start=1):
        template = deployment["spec"]["template"]
        for replica in range(deployment["spec"].get("replicas") or 1):
            out.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{deployment['metadata']['name']}-{replica}",
                             "namespace": deployment["metadata"]["namespace"],
                             "labels": dict(template["metadata"].get("labels") or {}),
                             "annotations": dict(template["metadata"].get("annotations") or {})},
                "spec": copy.deepcopy(template["spec"]),
                "status": {"phase": "Running", "podIP": f"10.1.{index}.{replica + 1}",
                           "podIPs": [{"ip": f"10.1.{index}.{replica + 1}"}],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
            if deployment["metadata"]["namespace"] in injected:
                out[-1]["spec"]["containers"].append(copy.deepcopy(sidecar))
    return out


def _container_port(pod: Obj, target: int | str) -> int:
    if isinstance(target, int):
        return target
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    raise ValueError(f"pod {pod['metadata']['name']} has no container port named {target!r}")


def endpoint_slices(objects: list[Obj], pod_list: list[Obj]) -> list[Obj]:
    """Per Service with a selector, one EndpointSlice of the pods it selects, as the endpoint controller
    writes it (ports resolved against the first selected pod's named container ports)."""
    out: list[Obj] = []
    for service in (o for o in objects if o["kind"] == "Service"):
        namespace = service["metadata"]["namespace"]
        selector = service["spec"].get("selector") or {}
        selected = [p for p in pod_list if p["metadata"]["namespace"] == namespace
                    and _selects(selector, p["metadata"]["labels"])]
        if not selected:
            continue
        ports = [{"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"),
                  "port": _container_port(selected[0], p.get("targetPort", p["port"])),
                  **({"appProtocol": p["appProtocol"]} if "appProtocol" in p else {})}
                 for p in service["spec"]["ports"]]
        out.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service['metadata']['name']}-0", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service["metadata"]["name"],
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": namespace}}
                          for p in selected],
            "ports": ports,
        })
    return out


def gateway_secrets(objects: list[Obj]) -> list[Obj]:
    """The TLS Secret each HTTPS Gateway server names (`credentialName`), in the namespace of the ingress gateway
    its selector picks: what the user creates beside the tree (README: "TLS and tokens at the gateway")."""
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    out: dict[tuple[str, str], Obj] = {}
    for gateway in (o for o in objects if o["kind"] == "Gateway"):
        selector = gateway["spec"].get("selector") or {}
        namespaces = {d["metadata"].get("namespace", "default") for d in deployments
                      if _selects(selector, d["spec"]["template"]["metadata"].get("labels") or {})}
        for server in gateway["spec"].get("servers", []):
            name = (server.get("tls") or {}).get("credentialName")
            for namespace in sorted(namespaces) if name else []:
                out[namespace, name] = {
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": name, "namespace": namespace},
                    "data": _tls_pair(server["hosts"]),
                }
    return list(out.values())


def _tls_pair(hosts: list[str]) -> dict[str, str]:
    """A certificate for `hosts` and its key, as a TLS Secret's data (a throwaway CA of the mesh's own kind)."""
    with tempfile.TemporaryDirectory() as tmp:
        ca = pki.create_ca(Path(tmp))
        pair = pki.issue_server(ca, hosts, Path(tmp), "gateway")
        return {"tls.crt": base64.b64encode(pair.cert.read_bytes()).decode(),
                "tls.key": base64.b64encode(pair.key.read_bytes()).decode()}


def cluster_objects(objects: list[Obj], sidecar: Obj | None = None) -> list[Obj]:
    """The Pods and EndpointSlices a cluster would make from `objects` (`sidecar`: see `pods`), and the TLS
    Secrets of its HTTPS Gateways."""
    pod_list = pods(objects, sidecar)
    return pod_list + endpoint_slices(objects, pod_list) + gateway_secrets(objects)
