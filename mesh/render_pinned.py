"""The Kubernetes and Istio resources of split-version pinning (mesh.splits): several splits of one model,
every request on one split only. A writer of the `Pinning`, called by `render.render_tree` when `mesh.yaml`
lists `splits`.

- Every stage name that any split has gets one ServiceAccount, Service and PodDisruptionBudget (the splits
  of one model name their stages alike, so the first stage's Service serves every split's first stage);
  every split's stage versions get a Deployment `<stage>-<split>-<version>` labelled `app`, `version` and
  `split`, whose init container copies that split's model image (`<pipeline>-model:<sha12>-<split>`).
- Each stage's DestinationRule has one subset per split and version, `<split>-<version>`, selected by both
  labels; its VirtualService has one http route per split that has the stage, matching
  `x-pipeline-version` exactly, then a 400 `directResponse` naming the known splits for any other value,
  then (for a request that entered before pinning, with no header) the running split's route.
- The gateway's VirtualService routes a request naming a split to that split's first stage, refuses an
  unknown one, and assigns one that names none by the splits' weights, each weighted destination setting
  the header (`headers.request.set`), for REST and gRPC alike.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from mesh import render
from mesh.layout import subset_name
from mesh.plan import Hop, Plan, StagePlan
from mesh.render import GRPC_PREFIX, GRPC_RETRY_ON, PORT, Objects, fqdn
from mesh.splits import HEADER, Pinning, SplitPlan
from model_export.manifest import Manifest

SPLIT_LABEL = "split"


def model_image(manifest: Manifest, split: str) -> str:
    """The model image of one split: its own pipeline.json and stage files, tagged by the split."""
    return f"{render.model_image(manifest)}-{split}"


def deployment(manifest: Manifest, split: SplitPlan, stage: StagePlan, version_index: int) -> dict[str, Any]:
    """`<stage>-<split>-<version>`: render.deployment with the split in its name, labels and model image."""
    version = stage.versions[version_index]
    obj = render.deployment(manifest, split.plan, stage, version, stage.replicas)
    obj["metadata"]["name"] = f"{stage.name}-{split.name}-{version.name}"
    spec = obj["spec"]
    for labels in (obj["metadata"]["labels"], spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
        labels[SPLIT_LABEL] = split.name
    spec["template"]["spec"]["initContainers"][0]["image"] = model_image(manifest, split.name)
    return obj


def _header(value: str | None) -> dict[str, Any]:
    """A header match: the exact split, or (None) any value at all."""
    return {HEADER: {"exact": value} if value is not None else {}}


def _retries(hop: Hop, retry_on: str | None = None) -> dict[str, Any]:
    if hop.route.attempts == 0:
        return {"attempts": 0}
    return {"attempts": hop.route.attempts, "perTryTimeout": render.duration(hop.route.per_try_timeout_s),
            "retryOn": retry_on or hop.route.istio_retry_on}


def _destinations(split: SplitPlan, hop: Hop, ns: str, port: int) -> list[dict[str, Any]]:
    return [{"destination": {"host": fqdn(hop.callee, ns), "subset": subset_name(split.name, d.version),
                             "port": {"number": port}}, "weight": d.weight} for d in hop.route.destinations]


def _route(name: str, match: list[dict[str, Any]], route: list[dict[str, Any]], hop: Hop,
           grpc: bool = False) -> dict[str, Any]:
    http: dict[str, Any] = {"name": name, "match": match, "route": route,
                            "timeout": render.duration(hop.route.timeout_s),
                            "retries": _retries(hop, GRPC_RETRY_ON if grpc else None)}
    if hop.route.fault is not None and not grpc:
        http["fault"] = render._fault(hop.route.fault)
    return http


def _refusal(name: str, match: list[dict[str, Any]], message: str) -> dict[str, Any]:
    return {"name": name, "match": match, "directResponse": {"status": 400, "body": {"string": json.dumps(
        {"error": message})}}}


def _with_header(matches: list[dict[str, Any]], value: str | None) -> list[dict[str, Any]]:
    if not matches:
        return [{"headers": _header(value)}]
    return [{**copy.deepcopy(m), "headers": _header(value)} for m in matches]


def _split_hops(pinning: Pinning, stage: str) -> list[tuple[SplitPlan, Hop]]:
    """Per split that has `stage`, the hop into it; the running pipeline's first."""
    out = []
    for s in pinning.splits:
        if stage in {st.name for st in s.plan.stages}:
            out.append((s, s.plan.hop_into(stage)))
    return out


def stage_virtual_service(pinning: Pinning, stage: str, ns: str) -> dict[str, Any]:
    hops = _split_hops(pinning, stage)
    http = [_route(s.name, _with_header([], s.name), _destinations(s, hop, ns, PORT), hop) for s, hop in hops]
    http.append(_refusal("unknown-split", _with_header([], None),
                         f"{HEADER} names no split with stage {stage}; expected one of "
                         f"{', '.join(s.name for s, _ in hops)}"))
    first, hop = hops[0]
    http.append(_route("unpinned", [{"uri": {"prefix": "/"}}], _destinations(first, hop, ns, PORT), hop))
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": render._meta(stage, ns),
            "spec": {"hosts": [fqdn(stage, ns)], "http": http}}


def destination_rule(pinning: Pinning, stage: str, ns: str) -> dict[str, Any]:
    hops = _split_hops(pinning, stage)
    rule = render.destination_rule(hops[0][1], ns)
    rule["spec"]["subsets"] = [{"name": subset_name(s.name, v), "labels": {"version": v, SPLIT_LABEL: s.name}}
                               for s, hop in hops for v in hop.upstream.subsets]
    return rule


def _assigned(pinning: Pinning, ns: str, port: int) -> list[dict[str, Any]]:
    first = {s.name: s.plan.hops[0].callee for s in pinning.splits}
    return [{"destination": {"host": fqdn(first[a.split], ns), "subset": subset_name(a.split, a.version),
                             "port": {"number": port}},
             "weight": a.weight, "headers": {"request": {"set": {HEADER: a.split}}}} for a in pinning.assignments()]


def gateway_virtual_service(manifest: Manifest, pinning: Pinning, primary: Plan) -> dict[str, Any]:
    ns = primary.namespace
    paths = [render._uri_match(p) for p in primary.gateway_paths]
    grpc = [{"uri": {"prefix": GRPC_PREFIX}}]
    http = []
    for s in pinning.splits:
        hop = s.plan.hops[0]
        http.append(_route(f"pipeline-{s.name}", _with_header(paths, s.name), _destinations(s, hop, ns, PORT), hop))
        http.append(_route(f"pipeline-grpc-{s.name}", _with_header(grpc, s.name),
                           _destinations(s, hop, ns, render.GRPC_PORT), hop, grpc=True))
    http.append(_refusal("unknown-split", _with_header(paths + grpc, None), pinning.refusal()))
    hop = pinning.unassigned_hop()
    http.append(_route("pipeline", paths, _assigned(pinning, ns, PORT), hop))
    http.append(_route("pipeline-grpc", grpc, _assigned(pinning, ns, render.GRPC_PORT), hop, grpc=True))
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": render._meta(f"{manifest.name}-gateway", ns),
            "spec": {"hosts": [primary.gateway.host], "gateways": [manifest.name], "http": render.gateway_sets(http)}}


def stage_names(pinning: Pinning) -> list[StagePlan]:
    """One StagePlan per stage name over every split (the running pipeline's where it has the stage)."""
    seen: dict[str, StagePlan] = {}
    for s in pinning.splits:
        for st in s.plan.stages:
            seen.setdefault(st.name, st)
    return sorted(seen.values(), key=lambda st: (st.index, st.name))


def base(manifests: dict[str, Manifest], pinning: Pinning) -> Objects:
    """Namespace; per stage name ServiceAccount, Service, PodDisruptionBudget; per split and version a
    Deployment (every split's versions at once: the splits' weights are the rollout)."""
    primary = pinning.splits[0].plan
    ns = primary.namespace
    objs: Objects = {render._file("Namespace", ns): render.namespace_obj(primary)}
    for st in stage_names(pinning):
        objs[render._file("ServiceAccount", st.name)] = render.service_account(st, ns)
        objs[render._file("Service", st.name)] = render.service(st, ns)
        objs[render._file("PodDisruptionBudget", st.name)] = render.pod_disruption_budget(st, ns)
    for s in pinning.splits:
        for st in s.plan.stages:
            for i, v in enumerate(st.versions):
                name = f"{st.name}-{s.name}-{v.name}"
                objs[render._file("Deployment", name)] = deployment(manifests[s.name], s, st, i)
    return objs


def istio(manifest: Manifest, pinning: Pinning) -> Objects:
    """Per stage name its DestinationRule, VirtualService, AuthorizationPolicy and buffer EnvoyFilter; the
    gateway's VirtualService. (Gateway, PeerAuthentication, Telemetry and the rest: render's, unchanged.)"""
    primary = pinning.splits[0].plan
    ns = primary.namespace
    objs: Objects = {render._file("VirtualService", manifest.name, "gateway"):
                     gateway_virtual_service(manifest, pinning, primary)}
    for st in stage_names(pinning):
        hops = [hop for _, hop in _split_hops(pinning, st.name)]
        objs[render._file("DestinationRule", st.name, "mtls")] = destination_rule(pinning, st.name, ns)
        objs[render._file("VirtualService", st.name, "chain")] = stage_virtual_service(pinning, st.name, ns)
        principals = sorted({p for hop in hops for p in hop.allowed_principals})
        allow = hops[0].model_copy(update={"allowed_principals": principals})
        objs[render._file("AuthorizationPolicy", st.name, "allow-caller")] = render.allow_caller(allow, ns)
        widest = max(hops, key=lambda h: h.upstream.buffer_limit_bytes if render.needs_buffer_filter(h) else 0)
        if render.needs_buffer_filter(widest):
            objs[render._file("EnvoyFilter", st.name, "buffer-limit")] = render.buffer_filter(primary, widest)
    return objs

