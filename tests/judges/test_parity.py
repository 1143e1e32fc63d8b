"""istiod's own translation of the rendered tree, compared hop by hop with the local mesh's Envoy config.

istiod's side comes from Istio's generator (`istio-judge xds`: Istio's pilot/test/xds fake discovery server
fed the rendered objects, Istio's ingress gateway and Pods/EndpointSlices derived from the Deployments);
the local side from `mesh.envoy_config` for the same plan. Every field must agree, or be listed in
`mesh.parity.KNOWN_DIFFERENCES` with the reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mesh import parity
from mesh.__main__ import main
from mesh.k8s_validate import kustomize_build
from mesh.plan import Plan, resolve
from mesh.policy import Policy, load_policy
from mesh.render import render_tree, write_tree
from model_export.manifest import Manifest, load_manifest
from tests.judges import istiod
from tests.judges.istio import GoUnavailable, ToolMissing, tool

REPO = Path(__file__).resolve().parents[2]
Objs = list[dict[str, Any]]
TINY_POLICY = {  # the policy tests/conftest.py renders the tiny tree with
    "namespace": "tiny-ns",
    "defaults": {"buffer_limit_bytes": 4 << 20, "retries": {"attempts": 2, "per_try_timeout_s": 1.0}},
}


@pytest.fixture(scope="module", autouse=True)
def istio_judge() -> None:
    try:
        tool("istio-judge")
        tool("istioctl")
    except (ToolMissing, GoUnavailable) as missing:
        pytest.skip(f"Istio's tools are not built: {missing}")


@pytest.fixture(scope="module")
def committed() -> tuple[Plan, Objs]:
    plan = resolve(load_policy(REPO / "mesh-planned.yaml"), load_manifest(REPO / "examples" / "reference"))
    return plan, kustomize_build(REPO / "kustomize" / "overlays" / "dev")


@pytest.fixture(scope="module")
def tiny(tiny_pipeline: tuple[Path, Manifest], tiny_tree: Path) -> tuple[Plan, Objs]:
    _, manifest = tiny_pipeline
    policy = dict(TINY_POLICY, stages={manifest.stages[0].name: {
        "versions": [{"name": "v1", "weight": 75}, {"name": "v2", "weight": 25}]}})
    return resolve(Policy.model_validate(policy), manifest), kustomize_build(tiny_tree / "overlays" / "canary")


@pytest.fixture(scope="module")
def dark_launch(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Objs]:
    """The tiny pipeline with a second version of its first stage deployed at weight 0."""
    _, manifest = tiny_pipeline
    policy = Policy.model_validate(dict(TINY_POLICY, stages={manifest.stages[0].name: {
        "versions": [{"name": "v1", "weight": 100}, {"name": "v2", "weight": 0}]}}))
    out = tmp_path_factory.mktemp("dark-launch")
    write_tree(render_tree(manifest, policy), out)
    return resolve(policy, manifest), kustomize_build(out / "overlays" / "canary")


@pytest.fixture(scope="module")
def generated(committed: tuple[Plan, Objs], tiny: tuple[Plan, Objs]) -> dict[str, dict[str, Any]]:
    return {"committed": istiod.generated_config(committed[1]), "tiny": istiod.generated_config(tiny[1])}


@pytest.mark.parametrize("tree", ["committed", "tiny"])
def test_istiod_agrees_with_the_local_mesh_on_every_hop(tree: str, committed: tuple[Plan, Objs],
                                                        tiny: tuple[Plan, Objs],
                                                        generated: dict[str, dict[str, Any]]) -> None:
    plan = {"committed": committed, "tiny": tiny}[tree][0]
    rows = parity.compare(plan, generated[tree])
    assert {r.hop for r in rows} == {parity.hop_label(h) for h in plan.hops} | {parity.grpc_label(plan)}
    assert len(rows) >= 30 * len(plan.hops)
    assert parity.unexplained(rows) == []


def test_the_buffer_limit_envoyfilter_lands(tiny: tuple[Plan, Objs], generated: dict[str, dict[str, Any]]) -> None:
    """istiod's listener of each caller and its cluster of the callee carry the plan's buffer limit: the
    EnvoyFilter's match found them (an EnvoyFilter matching nothing is silently ignored)."""
    plan = tiny[0]
    rows = {(r.hop, r.field): r for r in parity.compare(plan, generated["tiny"])}
    for hop in plan.hops:
        expected = str(hop.upstream.buffer_limit_bytes)
        assert expected == str(4 << 20)
        assert rows[parity.hop_label(hop), "caller listener buffer limit"].istiod == expected
        for version in hop.upstream.subsets:
            assert rows[parity.hop_label(hop), f"{version} cluster buffer limit"].istiod == expected


def test_weighted_versions_reach_istiod(tiny: tuple[Plan, Objs], generated: dict[str, dict[str, Any]]) -> None:
    rows = parity.compare(tiny[0], generated["tiny"])
    first = parity.hop_label(tiny[0].hops[0])
    assert next(r for r in rows if r.hop == first and r.field == "weighted clusters").istiod == "v1=75, v2=25"


def test_a_version_at_weight_0_is_deployed_but_not_routed(dark_launch: tuple[Plan, Objs]) -> None:
    """What the plan decides for weight 0 (kept deployed, no route destination) is what istiod pushes."""
    plan, objects = dark_launch
    rows = parity.compare(plan, istiod.generated_config(objects))
    assert parity.unexplained(rows) == []
    first = parity.hop_label(plan.hops[0])
    fields = {r.field: r for r in rows if r.hop == first}
    assert fields["weighted clusters"].istiod == "v1=100"
    assert fields["v2 upstream TLS SAN"].istiod  # its cluster exists, so raising its weight is a route change only
    # and the reason the plan gives: a VirtualService listing it at weight 0 gets the same route from istiod
    listed = copy.deepcopy(objects)
    for service in (o for o in listed if o["kind"] == "VirtualService" and o["metadata"]["name"].startswith(
            plan.hops[0].callee) or o["kind"] == "VirtualService" and o["spec"].get("gateways")):
        route = service["spec"]["http"][0]["route"]
        route.append(copy.deepcopy(route[0]) | {"weight": 0})
        route[-1]["destination"] = route[0]["destination"] | {"subset": "v2"}
    again = parity.compare(plan, istiod.generated_config(listed))
    assert next(r for r in again if r.hop == first and r.field == "weighted clusters").istiod == "v1=100"


def test_an_envoyfilter_that_matches_nothing_shows_as_a_difference(tiny: tuple[Plan, Objs]) -> None:
    plan, objects = tiny
    broken = copy.deepcopy(objects)
    for envoy_filter in (o for o in broken if o["kind"] == "EnvoyFilter"):
        for patch in envoy_filter["spec"]["configPatches"]:
            match = patch["match"]
            (match.get("listener") or match.get("cluster"))["portNumber"] = 9090
    different = parity.unexplained(parity.compare(plan, istiod.generated_config(broken)))
    assert {r.field for r in different} >= {"caller listener buffer limit", "v1 cluster buffer limit"}
    assert all(r.istiod == str(parity.ENVOY_BUFFER) for r in different)


def test_the_gateways_mark_and_grpc_route_are_compared(tiny: tuple[Plan, Objs]) -> None:
    """The header the gateway sets (the first stage's guard of its own name), the first stage's demand for it
    and the gRPC route's one service are read from both sides: a gateway VirtualService and a first stage's
    AuthorizationPolicy without them differ, field by field."""
    plan, objects = tiny
    broken = copy.deepcopy(objects)
    gateway_service = next(o for o in broken if o["kind"] == "VirtualService" and o["spec"].get("gateways"))
    for route in gateway_service["spec"]["http"]:
        route.pop("headers")
        if route["name"] == "pipeline-grpc":
            route["match"] = [{"uri": {"prefix": "/"}}]
    first_allows = next(o for o in broken if o["kind"] == "AuthorizationPolicy"
                        and o["metadata"]["name"] == f"{plan.hops[0].callee}-allow-caller")
    first_allows["spec"]["rules"][0].pop("when")
    different = {(r.hop, r.field): r for r in parity.unexplained(parity.compare(plan,
                                                                                istiod.generated_config(broken)))}
    first, grpc = parity.hop_label(plan.hops[0]), parity.grpc_label(plan)
    assert set(different) == {(first, "request headers set"), (grpc, "request headers set"), (grpc, "route match"),
                              (first, "inbound RBAC required headers")}
    assert different[first, "request headers set"].local == "x-pipeline-gateway=true"
    assert different[first, "inbound RBAC required headers"].local == "x-pipeline-gateway=true"
    assert different[first, "inbound RBAC required headers"].istiod == "-"
    assert different[grpc, "route match"].istiod == "prefix:/"


def test_parity_command_prints_the_table(committed: tuple[Plan, Objs], generated: dict[str, dict[str, Any]],
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "istiod.json"
    dump.write_text(json.dumps(generated["committed"]))
    args = ["parity", "--pipeline", str(REPO / "examples" / "reference"), "--policy", str(REPO / "mesh-planned.yaml"),
            "--istiod", str(dump)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gateway -> reference-stage-0" in out and "inbound RBAC principals" in out
    assert "0 differ without a listed reason" in out
    assert main([*args[:-1], str(REPO / "mesh.yaml")]) == 2  # not istiod's JSON: one line, exit 2
    assert "expected the JSON of python -m tests.judges.istiod" in capsys.readouterr().err


def test_istiod_checks_tokens_at_the_gateway_as_the_local_mesh_does(committed: tuple[Plan, Objs],
                                                                    generated: dict[str, dict[str, Any]]) -> None:
    """istiod's ingress gateway, on the HTTPS listener, checks tokens of the policy's issuer and audiences (the
    parity rows) and denies the pipeline's paths to a request with no token's principal: a DENY RBAC rule whose
    principal is the absence of the jwt_authn payload's iss and sub (Istio's `notRequestPrincipals: ["*"]`)."""
    plan = committed[0]
    rows = {(r.hop, r.field): r for r in parity.compare(plan, generated["committed"])}
    first = parity.hop_label(plan.hops[0])
    assert rows[first, "token issuers"].istiod == rows[first, "token issuers"].local == plan.gateway.auth.issuer
    assert rows[first, "token audiences"].istiod == ",".join(plan.gateway.auth.audiences)
    listener = next(li for li in generated["committed"]["istio-ingressgateway"]["listeners"]
                    if li["name"] == "0.0.0.0_8443")
    deny = [f["typed_config"]["rules"] for chain in listener["filter_chains"] for f in
            chain["filters"][0]["typed_config"]["http_filters"]
            if f["name"] == "envoy.filters.http.rbac" and f["typed_config"]["rules"].get("action") == "DENY"]
    [policy] = [p for rules in deny for name, p in rules["policies"].items() if "require-token" in name]
    text = json.dumps(policy)
    assert '"not_id"' in text and '"key": "iss"' in text and '"key": "sub"' in text
    assert '"prefix": "/v2/models/reference/"' in text and '"exact": "pipeline.local"' in text
