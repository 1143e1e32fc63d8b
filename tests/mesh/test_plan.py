"""The plan of hops: one decision per question, written out alike by the local Envoy config and the Istio tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import envoy_config
from mesh.layout import plan as plan_layout
from mesh.local import _app_env
from mesh.pki import CertPair
from mesh.plan import (
    APP_TIMEOUT_MARGIN_S,
    GATEWAY,
    PER_TRY_FLOOR_S,
    Placement,
    Plan,
    derived_per_try_timeouts,
    resolve,
)
from mesh.policy import Policy, PolicyError
from mesh.render import render_tree
from model_export.manifest import Manifest
from stage_service.settings import StageSettings

ISTIO_DEFAULT_RETRY_ON = {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}


def _resolve(manifest: Manifest, **policy: Any) -> Plan:
    return resolve(Policy.model_validate(policy), manifest)


def _istio(files: dict[str, str], kind: str, name: str) -> dict[str, Any]:
    for path, text in files.items():
        if path.startswith("components/istio/"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == kind and doc["metadata"]["name"] == name:
                    return doc
    raise KeyError((kind, name))


def _envoy(tmp_path: Path, manifest: Manifest, pipeline: Path, plan: Plan, stage: str) -> envoy_config.Resources:
    """The sidecar config of the first replica of `stage` (its outbound side holds the hop after it)."""
    layout = plan_layout(plan, manifest.name, pipeline, gateway_port=0, socket_dir=tmp_path)
    replica = next(r for r in layout.replicas if r.stage == stage)
    pair = CertPair(tmp_path / "c.pem", tmp_path / "k.pem")
    return envoy_config.sidecar(layout, plan, replica, pair, tmp_path / "ca.pem", tmp_path)


def _outbound_route(res: envoy_config.Resources) -> dict[str, Any]:
    route = next(r for r in res.routes if r["name"] == "outbound")["virtual_hosts"][0]["routes"][0]
    assert isinstance(route, dict)
    return route


def test_one_hop_per_stage_with_identities_derived_once(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    plan = _resolve(manifest, namespace="ml")
    assert [(h.caller, h.callee) for h in plan.hops] == [
        (GATEWAY, "tiny-stage-0"), ("tiny-stage-0", "tiny-stage-1"), ("tiny-stage-1", "tiny-stage-2")]
    for hop in plan.hops:
        callee = plan.stage(hop.callee)
        assert hop.callee_identity == callee.identity
        assert hop.upstream.expected_san == callee.identity.spiffe_id == f"spiffe://cluster.local/ns/ml/sa/{hop.callee}"
        assert hop.allowed_principals == [hop.caller_identity.principal]
        caller = plan.gateway_identity if hop.caller == GATEWAY else plan.stage(hop.caller).identity
        assert hop.caller_identity == caller
    assert plan.gateway_identity.principal == "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"


def test_weight_zero_version_is_deployed_but_not_routed_in_both_meshes(tiny_pipeline: tuple[Path, Manifest],
                                                                        tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    versions = [{"name": "v1", "weight": 100}, {"name": "v2", "weight": 0}]
    policy = {"stages": {"tiny-stage-1": {"versions": versions}}}
    plan = _resolve(manifest, **policy)
    hop = plan.hop_into("tiny-stage-1")
    assert hop.upstream.subsets == ["v1", "v2"] and [d.version for d in hop.route.destinations] == ["v1"]
    # local: a cluster per version, the route to v1 alone (as istiod writes a route with a 0-weighted version)
    res = _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0")
    assert {"outbound|v1|tiny-stage-1", "outbound|v2|tiny-stage-1"} <= {c["name"] for c in res.clusters}
    assert _outbound_route(res)["route"]["cluster"] == "outbound|v1|tiny-stage-1"
    # Istio: the canary overlay deploys v2 and defines its subset; the route names v1 alone
    files = render_tree(manifest, Policy.model_validate(policy))
    ops = yaml.safe_load(files["overlays/canary/patch-virtualservice-tiny-stage-1.yaml"])
    assert [r["destination"]["subset"] for r in ops[0]["value"]] == ["v1"]
    assert "overlays/canary/deployment-tiny-stage-1-v2.yaml" in files


def test_app_timeout_is_the_route_timeout_plus_a_margin_in_both_meshes(tiny_pipeline: tuple[Path, Manifest],
                                                                       tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    plan = _resolve(manifest, stages={"tiny-stage-1": {"timeout_s": 7.5}})
    expected = str(7.5 + APP_TIMEOUT_MARGIN_S)
    layout = plan_layout(plan, manifest.name, pipeline, gateway_port=0, socket_dir=tmp_path)
    replica = next(r for r in layout.replicas if r.stage == "tiny-stage-0")
    local_env = _app_env(tmp_path, pipeline / "pipeline.json", plan, replica)
    assert local_env["STAGE_TIMEOUT_S"] == expected
    deployment = yaml.safe_load(render_tree(manifest, Policy.model_validate(
        {"stages": {"tiny-stage-1": {"timeout_s": 7.5}}}))["base/deployment-tiny-stage-0-v1.yaml"])
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STAGE_TIMEOUT_S"] == expected
    last = next(r for r in layout.replicas if r.stage == "tiny-stage-2")
    assert "STAGE_TIMEOUT_S" not in _app_env(tmp_path, pipeline / "pipeline.json", plan, last)


def test_settings_to_env_round_trips(tiny_pipeline: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    _, manifest = tiny_pipeline
    plan = _resolve(manifest, defaults={"threads": 2},
                    stages={"tiny-stage-1": {"versions": [{"name": "v3", "weight": 100, "file": "s1.onnx"}]}})
    stage = plan.stage("tiny-stage-1")
    monkeypatch.setenv("STAGE_MAX_INFLIGHT", "5")  # the planning process's environment never leaks in
    settings = plan.settings(stage, stage.versions[0], Placement("/m/pipeline.json", Path("/m"), "0.0.0.0", 9000,
                                                                 "http://next:8080"), providers="cuda,cpu")
    env = settings.to_env()
    assert "STAGE_MAX_INFLIGHT" not in env
    assert env["STAGE_PROVIDERS"] == "cuda,cpu" and env["STAGE_THREADS"] == "2" and env["STAGE_FILE"] == "/m/s1.onnx"
    monkeypatch.delenv("STAGE_MAX_INFLIGHT")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert StageSettings() == StageSettings.model_validate(settings.model_dump())


def test_per_try_timeout_comes_from_measured_latency(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    slow = manifest.model_copy(update={"stages": [
        s.model_copy(update={"cost": s.cost.model_copy(update={"latency_ms": ms})})
        for s, ms in zip(manifest.stages, (50.0, 300.0, 10.0), strict=True)]})
    # a try into stage i covers stages i.. (10 x their latency, at least the floor) and the next hop's try
    assert derived_per_try_timeouts(slow) == [3.6 + 3.1 + PER_TRY_FLOOR_S, 3.1 + PER_TRY_FLOOR_S, PER_TRY_FLOOR_S]
    timeouts = {"tiny-stage-0": {"timeout_s": 5.0}, "tiny-stage-1": {"timeout_s": 4.0},
                "tiny-stage-2": {"timeout_s": 3.0}}
    plan = _resolve(slow, defaults={"replicas": 2}, stages=timeouts)
    # never over timeout_s (stage 0: 7.2 derived)
    assert [h.route.per_try_timeout_s for h in plan.hops] == [5.0, 3.1 + PER_TRY_FLOOR_S, PER_TRY_FLOOR_S]
    # into a stage of one replica a retry would reach the same process: the try may take the whole timeout
    single = _resolve(slow, stages={**timeouts, "tiny-stage-1": {"timeout_s": 4.0, "replicas": 2}})
    assert [h.route.per_try_timeout_s for h in single.hops] == [5.0, 3.1 + PER_TRY_FLOOR_S, 3.0]
    explicit = _resolve(slow, defaults={"retries": {"per_try_timeout_s": 0.25}})
    assert {h.route.per_try_timeout_s for h in explicit.hops} == {0.25}


def test_the_per_try_floor_comes_from_the_policy_in_both_meshes(tiny_pipeline: tuple[Path, Manifest],
                                                                  tmp_path: Path) -> None:
    """A stage's `retries.per_try_floor_s` is the least its derived try may take for its own stages; the local
    Envoy route and the rendered VirtualService carry the same per-try timeout."""
    pipeline, manifest = tiny_pipeline
    stages = {"tiny-stage-1": {"replicas": 2, "retries": {"per_try_floor_s": 0.2}}}
    plan = _resolve(manifest, defaults={"retries": {"per_try_floor_s": 0.3}}, stages=stages)
    assert plan.hop_into("tiny-stage-1").route.per_try_timeout_s == 0.2 + 0.3  # its floor plus stage 2's
    retry = _outbound_route(_envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0"))["route"]["retry_policy"]
    assert retry["per_try_timeout"] == "0.500s"
    vs = _istio(render_tree(manifest, Policy.model_validate({"defaults": {"retries": {"per_try_floor_s": 0.3}},
                                                              "stages": stages})), "VirtualService", "tiny-stage-1")
    assert vs["spec"]["http"][0]["retries"]["perTryTimeout"] == "0.5s"
    with pytest.raises(ValueError, match="per_try_floor_s"):
        Policy.model_validate({"defaults": {"retries": {"per_try_floor_s": 0}}})


def test_prod_overlay_gives_autoscaled_hops_their_per_try_timeouts(tiny_pipeline: tuple[Path, Manifest],
                                                                   tmp_path: Path) -> None:
    """Base serves one replica (per-try = the hop's timeout); prod runs at least the autoscaler's minimum, so its
    overlay patches in the per-try timeouts the plan derives at those replicas."""
    from mesh.k8s_validate import kustomize_build
    from mesh.render import write_tree

    _, manifest = tiny_pipeline
    write_tree(render_tree(manifest, Policy()), tmp_path)
    prod = resolve(Policy.model_validate({"defaults": {"replicas": 2}}), manifest)

    def per_try(overlay: str) -> dict[str, str]:
        return {o["metadata"]["name"]: o["spec"]["http"][0]["retries"]["perTryTimeout"]
                for o in kustomize_build(tmp_path / "overlays" / overlay) if o["kind"] == "VirtualService"}

    assert per_try("dev") == {"tiny-gateway": "15s", "tiny-stage-0": "15s", "tiny-stage-1": "10s",
                              "tiny-stage-2": "5s"}
    assert per_try("prod") == {"tiny-gateway": f"{prod.hops[0].route.per_try_timeout_s:g}s",
                               **{h.callee: f"{h.route.per_try_timeout_s:g}s" for h in prod.hops}}
    assert per_try("prod")["tiny-stage-2"] == f"{PER_TRY_FLOOR_S:g}s"


def test_default_retries_include_istios_defaults(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    plan = _resolve(manifest)
    retry = _outbound_route(_envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0"))["route"]["retry_policy"]
    assert ISTIO_DEFAULT_RETRY_ON | {"reset"} == set(retry["retry_on"].split(","))
    outbound = next(r for r in _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0").routes
                    if r["name"] == "outbound")
    assert outbound["virtual_hosts"][0]["include_request_attempt_count"] is True  # as istiod's virtual hosts
    assert retry["retriable_status_codes"] == [503]
    vs = _istio(render_tree(manifest, Policy()), "VirtualService", "tiny-stage-1")
    assert set(vs["spec"]["http"][0]["retries"]["retryOn"].split(",")) == ISTIO_DEFAULT_RETRY_ON | {"reset", "503"}


def test_outlier_detection_ejects_hung_replicas_in_both_meshes(tiny_pipeline: tuple[Path, Manifest],
                                                              tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    plan = _resolve(manifest, defaults={"outlier_detection": {"consecutive_gateway_errors": 4,
                                                              "consecutive_local_origin_failures": 2}})
    cluster = next(c for c in _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0").clusters
                   if c["name"] == "outbound|v1|tiny-stage-1")
    od = cluster["outlier_detection"]
    assert od["consecutive_gateway_failure"] == 4 and od["enforcing_consecutive_gateway_failure"] == 100
    assert od["split_external_local_origin_errors"] is True
    assert od["consecutive_local_origin_failure"] == 2 and od["enforcing_consecutive_local_origin_failure"] == 100
    dr = _istio(render_tree(manifest, Policy.model_validate(
        {"defaults": {"outlier_detection": {"consecutive_gateway_errors": 4,
                                            "consecutive_local_origin_failures": 2}}})), "DestinationRule",
                "tiny-stage-1")["spec"]["trafficPolicy"]["outlierDetection"]
    assert dr["consecutiveGatewayErrors"] == 4 and dr["consecutiveLocalOriginFailures"] == 2
    assert dr["splitExternalLocalOriginErrors"] is True


def test_fault_injection_in_both_meshes(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    fault = {"delay": {"percent": 10, "fixed_delay_s": 0.5}, "abort": {"percent": 2.5, "http_status": 503}}
    policy = {"stages": {"tiny-stage-1": {"fault": fault}}}
    plan = _resolve(manifest, **policy)
    res = _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0")
    per_route = _outbound_route(res)["typed_per_filter_config"][envoy_config.FAULT_FILTER]
    assert per_route["delay"] == {"fixed_delay": "0.500s", "percentage": {"numerator": 100_000,
                                                                          "denominator": "MILLION"}}
    assert per_route["abort"] == {"http_status": 503, "percentage": {"numerator": 25_000, "denominator": "MILLION"}}
    vs = _istio(render_tree(manifest, Policy.model_validate(policy)), "VirtualService", "tiny-stage-1")
    assert vs["spec"]["http"][0]["fault"] == {"delay": {"fixedDelay": "0.5s", "percentage": {"value": 10.0}},
                                              "abort": {"httpStatus": 503, "percentage": {"value": 2.5}}}
    other = _istio(render_tree(manifest, Policy.model_validate(policy)), "VirtualService", "tiny-stage-2")
    assert "fault" not in other["spec"]["http"][0]
    with pytest.raises(ValueError, match="needs a delay, an abort or both"):
        Policy.model_validate({"stages": {"tiny-stage-1": {"fault": {}}}})


def test_a_per_try_timeout_over_the_timeout_is_refused(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    with pytest.raises(PolicyError, match="per_try_timeout_s 9.0 exceeds its timeout_s"):
        _resolve(manifest, defaults={"retries": {"per_try_timeout_s": 9.0}})


def test_connection_pool_in_both_meshes(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    pipeline, manifest = tiny_pipeline
    pool = {"max_connections": 11, "max_pending_requests": 12, "max_requests": 13, "max_retries": 14,
            "connect_timeout_s": 0.75, "idle_timeout_s": 2.5}
    plan = _resolve(manifest, defaults={"connection_pool": pool})
    cluster = next(c for c in _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0").clusters
                   if c["name"] == "outbound|v1|tiny-stage-1")
    assert cluster["circuit_breakers"]["thresholds"] == [
        {"max_connections": 11, "max_pending_requests": 12, "max_requests": 13, "max_retries": 14}]
    assert cluster["connect_timeout"] == "0.750s"
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"] == {"idle_timeout": "2.500s"}
    assert options["explicit_http_config"] == {"http_protocol_options": {}}
    dr = _istio(render_tree(manifest, Policy.model_validate({"defaults": {"connection_pool": pool}})),
                "DestinationRule", "tiny-stage-1")["spec"]["trafficPolicy"]["connectionPool"]
    assert dr == {"tcp": {"maxConnections": 11, "connectTimeout": "0.75s"},
                  "http": {"http1MaxPendingRequests": 12, "http2MaxRequests": 13, "maxRetries": 14,
                           "idleTimeout": "2.5s"}}


def test_retry_budget_in_both_meshes(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    """Where the policy sets one, retries in flight stay a share of the requests in flight."""
    pipeline, manifest = tiny_pipeline
    budget = {"retry_budget": {"percent": 12.5, "min_retry_concurrency": 2}}
    plan = _resolve(manifest, defaults=budget)
    cluster = next(c for c in _envoy(tmp_path, manifest, pipeline, plan, "tiny-stage-0").clusters
                   if c["name"] == "outbound|v1|tiny-stage-1")
    assert cluster["circuit_breakers"]["thresholds"][0]["retry_budget"] == {
        "budget_percent": {"value": 12.5}, "min_retry_concurrency": 2}
    dr = _istio(render_tree(manifest, Policy.model_validate({"defaults": budget})), "DestinationRule",
                "tiny-stage-1")["spec"]["trafficPolicy"]
    assert dr["retryBudget"] == {"percent": 12.5, "minRetryConcurrency": 2}
    assert "retryBudget" not in _istio(render_tree(manifest, Policy()), "DestinationRule", "tiny-stage-1")["spec"][
        "trafficPolicy"]


def test_hops_command(tiny_pipeline: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.__main__ import main

    directory, manifest = tiny_pipeline
    assert main(["hops", "--pipeline", str(directory), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == resolve(Policy(), manifest).model_dump(mode="json")
    assert [(h["caller"], h["callee"]) for h in printed["hops"]][0] == (GATEWAY, "tiny-stage-0")
    assert main(["hops", "--pipeline", str(directory)]) == 0
    table = capsys.readouterr().out
    assert all(s.name in table for s in manifest.stages) and "3/3/1" in table
    assert main(["hops", "--pipeline", str(directory / "nowhere")]) == 2


def test_defaults_timeout_is_seconds_per_stage_so_it_fits_any_split(tiny_pipeline: tuple[Path, Manifest]) -> None:
    """`defaults.timeout_s` once refused every policy (each stage got the same timeout, which cannot shrink
    along the chain); it is the budget per stage, as the built-in 5 s is, and a stage's own value wins."""
    _, manifest = tiny_pipeline
    plan = _resolve(manifest, defaults={"timeout_s": 2.0})
    assert [h.route.timeout_s for h in plan.hops] == [6.0, 4.0, 2.0]
    mixed = _resolve(manifest, defaults={"timeout_s": 2.0}, stages={"tiny-stage-0": {"timeout_s": 9.0}})
    assert [h.route.timeout_s for h in mixed.hops] == [9.0, 4.0, 2.0]
