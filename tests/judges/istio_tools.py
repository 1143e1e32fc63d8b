"""Run Istio's own tools (built by `make istio-tools`) on rendered objects and read what they say."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.judges.istio import tool
from tests.judges.stand_ins import cluster_objects

Obj = dict[str, Any]
# The ingress gateway as Istio's default install makes it (`istioctl manifest generate`): what a rendered
# Gateway's `istio: ingressgateway` selector is meant to find in a cluster.
GATEWAY_OBJECTS = {("Deployment", "istio-ingressgateway"), ("Service", "istio-ingressgateway"),
                   ("ServiceAccount", "istio-ingressgateway-service-account")}


def _run(binary: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool(binary)), *args], input=stdin, capture_output=True, text=True, timeout=300,
                          check=False)


def write_objects(objects: list[Obj], path: Path) -> Path:
    """Objects as one multi-document YAML file, as `kubectl kustomize` prints them."""
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


@functools.cache
def ingress_gateway() -> tuple[Obj, ...]:
    """Istio's ingress gateway Deployment, Service and ServiceAccount from `istioctl manifest generate`."""
    done = _run("istioctl", "manifest", "generate")
    if done.returncode:
        raise RuntimeError(f"istioctl manifest generate failed: {done.stderr.strip()}")
    install = [d for d in yaml.safe_load_all(done.stdout) if d]
    found = tuple(d for d in install if (d["kind"], d["metadata"]["name"]) in GATEWAY_OBJECTS)
    if len(found) != len(GATEWAY_OBJECTS):
        raise RuntimeError(f"istioctl manifest generate lacks the ingress gateway: found {len(found)} of "
                           f"{sorted(GATEWAY_OBJECTS)}")
    return found


def proxy_container() -> Obj:
    """The `istio-proxy` container of Istio's own ingress gateway Deployment, standing in for the sidecar the
    injector adds to a pod of an injected namespace (`istioctl kube-inject` cannot run offline: it waits for
    a cluster's webhook configurations)."""
    deployment = next(o for o in ingress_gateway() if o["kind"] == "Deployment")
    container: Obj = next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                          if c["name"] == "istio-proxy")
    return container


def in_cluster(objects: list[Obj]) -> list[Obj]:
    """`objects` as a cluster would hold them: plus Istio's ingress gateway, plus Pods and EndpointSlices."""
    everything = [*objects, *ingress_gateway()]
    return everything + cluster_objects(everything, proxy_container())


def validate(path: Path) -> tuple[int, list[str]]:
    """`istioctl validate -f PATH`: its exit status and every warning or error line it printed."""
    done = _run("istioctl", "validate", "-f", str(path))
    lines = [line.strip().removeprefix("* ") for line in (done.stdout + done.stderr).splitlines()]
    return done.returncode, [line for line in lines if re.match(r"[A-Za-z]+/\S+: ", line)]


def analyze(path: Path) -> list[Obj]:
    """`istioctl analyze --use-kube=false --all-namespaces`, every message down to Info, as JSON."""
    done = _run("istioctl", "analyze", "--use-kube=false", "-A", "--output-threshold", "Info",
                "--failure-threshold", "Error", "-o", "json", str(path))
    return _messages(done, "istioctl analyze")


def analyze_with_runtime_objects(path: Path) -> tuple[list[Obj], list[str]]:
    """Every istioctl analyzer with the Pods/Services/Namespaces in PATH kept (istio-judge analyze): the
    messages, and the analyzers that still could not run."""
    done = _run("istio-judge", "analyze", str(path))
    skipped = [line.removeprefix("skipped analyzer: ") for line in done.stderr.splitlines()
               if line.startswith("skipped analyzer: ")]
    return _messages(done, "istio-judge analyze"), skipped


def _messages(done: subprocess.CompletedProcess[str], what: str) -> list[Obj]:
    start = done.stdout.find("[")
    if start < 0:
        raise RuntimeError(f"{what} printed no JSON (exit {done.returncode}): {done.stderr.strip()}")
    messages, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    return list(messages)


def xds(istio_objects: list[Obj], kubernetes_objects: list[Obj], proxies: list[Obj]) -> dict[str, Any]:
    """istiod's listeners, clusters and routes for each proxy (istio-judge xds), by proxy name."""
    request = {"istio": yaml.safe_dump_all(istio_objects, sort_keys=False),
               "kubernetes": yaml.safe_dump_all(kubernetes_objects, sort_keys=False), "proxies": proxies}
    done = _run("istio-judge", "xds", stdin=json.dumps(request))
    if done.returncode:
        raise RuntimeError(f"istio-judge xds failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result
