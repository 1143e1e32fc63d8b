"""`python -m mesh render`: layout, determinism, values from the policy, canary, buffer limits, committed tree."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.__main__ import main
from mesh.plan import resolve
from mesh.policy import Policy, PolicyError
from mesh.render import render_tree
from model_export.manifest import Manifest, load_manifest

REPO = Path(__file__).resolve().parents[2]
NETWORKING = ("gateway", "virtualservice", "destinationrule", "peerauthentication", "authorizationpolicy",
              "telemetry", "envoyfilter")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _by_kind(files: dict[str, str], prefix: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in files.items():
        if path.startswith(prefix) and path.endswith(".yaml") and not path.endswith("kustomization.yaml"):
            for d in _docs(text):
                if isinstance(d, dict) and "kind" in d:
                    out.setdefault(d["kind"], []).append(d)
    return out


def _policy(**data: Any) -> Policy:
    return Policy.model_validate(data)


def test_layout_one_resource_per_file_named_by_kind(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    files = render_tree(manifest, Policy())
    resources = [p for p in files if p.endswith(".yaml") and not p.endswith("kustomization.yaml")
                 and "/patch-" not in p]
    assert resources
    for path in resources:
        docs = _docs(files[path])
        assert len(docs) == 1, path
        name = Path(path).name
        kind = docs[0]["kind"].lower()
        assert name.startswith(f"{kind}-"), path
        if kind in NETWORKING:
            assert re.fullmatch(rf"{kind}-[a-z0-9-]+-[a-z0-9-]+\.yaml", name), path
    component = yaml.safe_load(files["components/istio/kustomization.yaml"])
    assert component["kind"] == "Component"
    assert all("commonLabels" not in text for text in files.values())
    for overlay in ("dev", "prod", "gpu", "canary"):
        k = yaml.safe_load(files[f"overlays/{overlay}/kustomization.yaml"])
        assert k["resources"][0] == "../../base" and k["components"] == ["../../components/istio"]


def test_workload_conventions(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    kinds = _by_kind(render_tree(manifest, Policy()), "base/")
    names = [s.name for s in manifest.stages]
    assert sorted(sa["metadata"]["name"] for sa in kinds["ServiceAccount"]) == sorted(names)
    assert sorted(d["metadata"]["name"] for d in kinds["Deployment"]) == sorted(f"{n}-v1" for n in names)
    for svc in kinds["Service"]:
        first = svc["metadata"]["name"] == names[0]  # gRPC only where clients come in
        assert [(p["name"], p["port"], p["appProtocol"]) for p in svc["spec"]["ports"]] == [
            ("http", 8080, "http"), *([("grpc", 8081, "grpc")] if first else [])]
    for d in kinds["Deployment"]:
        pod = d["spec"]["template"]
        assert set(pod["metadata"]["labels"]) == {"app", "version"}
        spec = pod["spec"]
        assert spec["serviceAccountName"] == pod["metadata"]["labels"]["app"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 1337
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["STAGE_MANIFEST"] == "/models/pipeline.json" and env["STAGE_PORT"] == "8080"
        if pod["metadata"]["labels"]["app"] == names[0]:
            assert env["STAGE_GRPC_PORT"] == "8081" and [p["name"] for p in c["ports"]] == ["http", "grpc"]
        else:
            assert "STAGE_GRPC_PORT" not in env and [p["name"] for p in c["ports"]] == ["http"]
        # the model files come from the init container into the shared emptyDir
        assert spec["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/models"
    last = next(d for d in kinds["Deployment"] if d["metadata"]["labels"]["app"] == names[-1])
    assert "STAGE_NEXT_URL" not in {e["name"] for e in last["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert len(kinds["PodDisruptionBudget"]) == len(names)


def test_render_is_deterministic(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    policy = _policy(stages={manifest.stages[1].name: {"versions": [{"name": "v1", "weight": 70},
                                                                     {"name": "v2", "weight": 30}]}})
    first, second = render_tree(manifest, policy), render_tree(manifest, policy)
    assert first == second
    assert list(first) == sorted(first)
    assert not any(re.search(r"20\d\d-\d\d-\d\dT", text) for text in first.values())


def test_values_come_from_the_resolved_policy(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    s0, s1, s2 = (s.name for s in manifest.stages)
    policy = _policy(
        namespace="ml", gateway={"host": "tiny.example.com"},
        defaults={"replicas": 2, "threads": 3, "retries": {"attempts": 2, "per_try_timeout_s": 0.5,
                                                           "retry_on": ["reset", "503"]}},
        stages={s0: {"timeout_s": 9.5}, s1: {"timeout_s": 4, "outlier_detection": {"consecutive_5xx": 7}},
                s2: {"timeout_s": 1.25, "connection_pool": {"max_requests": 33}}},
    )
    resolved = resolve(policy, manifest)
    files = render_tree(manifest, policy)
    base, istio = _by_kind(files, "base/"), _by_kind(files, "components/istio/")
    assert {o["metadata"].get("namespace") for kind in ("Deployment", "Service") for o in base[kind]} == {"ml"}
    for d in base["Deployment"]:
        stage = resolved.stage(d["metadata"]["labels"]["app"])
        assert d["spec"]["replicas"] == stage.replicas == 2
        env = {e["name"]: e["value"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["STAGE_THREADS"] == "3"
        if stage.index < 2:
            nxt = resolved.hops[stage.index + 1]
            assert env["STAGE_NEXT_URL"] == f"http://{nxt.callee}.ml.svc.cluster.local:8080"
            # the caller's sidecar answers a timeout first; the app's own is a backstop 1 s later
            assert float(env["STAGE_TIMEOUT_S"]) == nxt.route.timeout_s + 1.0
    vs = {v["metadata"]["name"]: v for v in istio["VirtualService"]}
    assert vs[s0]["spec"]["http"][0]["timeout"] == "9.5s"
    assert vs[s2]["spec"]["http"][0]["timeout"] == "1.25s"
    assert vs[s1]["spec"]["http"][0]["retries"] == {"attempts": 2, "perTryTimeout": "0.5s",
                                                    "retryOn": "reset,retriable-status-codes,503"}
    assert vs["tiny-gateway"]["spec"]["hosts"] == ["tiny.example.com"]
    dr = {d["metadata"]["name"]: d for d in istio["DestinationRule"]}
    assert dr[s1]["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 7
    assert dr[s2]["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] == 33
    assert istio["Gateway"][0]["spec"]["servers"][0]["hosts"] == ["tiny.example.com"]
    aps = {a["metadata"]["name"]: a for a in istio["AuthorizationPolicy"]}
    assert aps["allow-nothing"]["spec"] == {}
    assert aps[f"{s1}-allow-caller"]["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        f"cluster.local/ns/ml/sa/{s0}"]
    assert aps[f"{s0}-allow-caller"]["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
    # the gateway is admitted to the first stage only with its mark; stage to stage asks for no header
    assert aps[f"{s0}-allow-caller"]["spec"]["rules"][0]["when"] == [
        {"key": "request.headers[x-pipeline-gateway]", "values": ["true"]}]
    assert "when" not in aps[f"{s1}-allow-caller"]["spec"]["rules"][0]
    dashboard = json.loads(files["base/grafana-dashboard-tiny.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("istio_requests_total", "istio_request_duration_milliseconds_bucket", "stage_requests_total",
                   "stage_inference_duration_seconds_bucket", "stage_inflight_requests"):
        assert metric in exprs
    assert all(f'app="{s}"' in exprs for s in (s0, s1, s2))


def test_canary_versions_from_the_policy(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    s1 = manifest.stages[1].name
    policy = _policy(stages={s1: {"versions": [{"name": "v1", "weight": 80},
                                               {"name": "v2", "weight": 20, "file": "stage-1-v2.onnx"}]}})
    files = render_tree(manifest, policy)
    base = _by_kind(files, "base/")
    assert f"{s1}-v2" not in {d["metadata"]["name"] for d in base["Deployment"]}
    stable_vs = next(v for v in _by_kind(files, "components/")["VirtualService"] if v["metadata"]["name"] == s1)
    assert [r["weight"] for r in stable_vs["spec"]["http"][0]["route"]] == [100]
    canary = yaml.safe_load(files[f"overlays/canary/deployment-{s1}-v2.yaml"])
    env = {e["name"]: e["value"] for e in canary["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STAGE_FILE"] == "/models/stage-1-v2.onnx" and env["STAGE_VERSION"] == "v2"
    ops = yaml.safe_load(files[f"overlays/canary/patch-virtualservice-{s1}.yaml"])
    assert [(r["destination"]["subset"], r["weight"]) for r in ops[0]["value"]] == [("v1", 80), ("v2", 20)]


def test_canary_default_is_next_version_of_last_stage(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    last = manifest.stages[-1].name
    files = render_tree(manifest, Policy())
    assert f"overlays/canary/deployment-{last}-v2.yaml" in files
    ops = yaml.safe_load(files[f"overlays/canary/patch-virtualservice-{last}.yaml"])
    assert [r["weight"] for r in ops[0]["value"]] == [90, 10]


def test_buffer_limit_envoyfilter_on_the_caller_side(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    limit = 4 << 20
    files = render_tree(manifest, _policy(defaults={"buffer_limit_bytes": limit}))
    filters = {f["metadata"]["name"]: f for f in _by_kind(files, "components/")["EnvoyFilter"]
               if f["metadata"]["name"].endswith("-buffer-limit")}
    assert sorted(filters) == sorted(f"{s.name}-buffer-limit" for s in manifest.stages)
    first = filters[f"{manifest.stages[0].name}-buffer-limit"]
    assert first["metadata"]["namespace"] == "istio-system"
    assert first["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    second = filters[f"{manifest.stages[1].name}-buffer-limit"]
    assert second["spec"]["workloadSelector"]["labels"] == {"app": manifest.stages[0].name}
    for patch in second["spec"]["configPatches"]:
        assert patch["patch"]["value"] == {"per_connection_buffer_limit_bytes": limit}
    # Envoy's default (1 MiB) suffices for the tiny activations: no filter then
    assert not [f for f in _by_kind(render_tree(manifest, Policy()), "components/")["EnvoyFilter"]
                if f["metadata"]["name"].endswith("-buffer-limit")]


def test_client_limits_envoyfilters_on_gateway_and_sidecars(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    files = render_tree(manifest, _policy(clients={"request_headers_timeout_s": 3, "max_request_headers_kb": 16,
                                                   "max_headers_count": 40}))
    filters = {f["metadata"]["name"]: f for f in _by_kind(files, "components/")["EnvoyFilter"]}
    gateway, sidecars = filters["tiny-client-limits"], filters["client-limits"]
    assert gateway["metadata"]["namespace"] == "istio-system"
    assert gateway["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    assert "workloadSelector" not in sidecars["spec"]  # every sidecar of the namespace
    for envoy_filter, context in ((gateway, "GATEWAY"), (sidecars, "SIDECAR_INBOUND")):
        [patch] = envoy_filter["spec"]["configPatches"]
        assert patch["match"]["context"] == context
        hcm = patch["patch"]["value"]["typed_config"]
        assert hcm["request_headers_timeout"] == "3.000s"
        assert hcm["stream_idle_timeout"] == "16.000s"  # the gateway hop's 15 s timeout + 1 s
        assert hcm["max_request_headers_kb"] == 16
        assert hcm["common_http_protocol_options"] == {"max_headers_count": 40}


def test_stream_idle_timeout_below_the_gateway_timeout_refused(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    with pytest.raises(PolicyError, match="clients.stream_idle_timeout_s: 5.0 must exceed"):
        render_tree(manifest, _policy(clients={"stream_idle_timeout_s": 5}))


def test_gateway_routes_only_the_pipeline_and_health(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    [vs] = [v for v in _by_kind(render_tree(manifest, Policy()), "components/")["VirtualService"]
            if v["spec"].get("gateways")]
    assert vs["spec"]["http"][0]["match"] == [
        {"uri": {"exact": "/v2/models/tiny"}}, {"uri": {"prefix": "/v2/models/tiny/"}},
        {"uri": {"prefix": "/v2/health/"}}]


def test_cli_renders_from_a_directory_with_only_the_manifest(tiny_pipeline: tuple[Path, Manifest],
                                                             tmp_path: Path) -> None:
    directory, _ = tiny_pipeline
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(directory / "pipeline.json", only / "pipeline.json")
    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    (out / "base" / "stale.yaml").write_text("stale: true\n")
    assert main(["render", "--pipeline", str(only), "--out", str(out)]) == 0
    assert (out / "components/istio/kustomization.yaml").is_file()
    assert not (out / "base" / "stale.yaml").exists()


def test_cli_rejects_a_policy_that_does_not_fit(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = tiny_pipeline
    policy = tmp_path / "mesh.yaml"
    policy.write_text("stages:\n  no-such-stage: {replicas: 2}\n")
    assert main(["render", "--pipeline", str(directory), "--policy", str(policy), "--out", str(tmp_path)]) == 2
    assert "no-such-stage" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()


def planned_command(planned: Path) -> list[str]:
    """The `mesh plan` options that wrote `planned`, read from the command its first line names."""
    match = re.match(r"# Written by `python -m mesh (plan [^`]+)`", planned.read_text())
    assert match, f"{planned} does not say how it was written"
    return shlex.split(match.group(1))


def test_committed_tree_is_the_render_of_the_reference_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """mesh-planned.yaml is `mesh plan --base mesh.yaml` on the reference pipeline's costs, and kustomize/ is
    `mesh render` of it, byte for byte (`make render` runs both)."""
    monkeypatch.chdir(REPO)  # the planned file names its base relative to the repository
    reference = REPO / "examples/reference"
    planned = tmp_path / "mesh-planned.yaml"
    assert main([*planned_command(REPO / "mesh-planned.yaml"), "--pipeline", str(reference), "--out",
                 str(planned)]) == 0
    assert planned.read_text() == (REPO / "mesh-planned.yaml").read_text(), "re-run `make render` and commit"
    tree_dir = tmp_path / "tree"
    assert main(["render", "--pipeline", str(reference), "--policy", str(planned), "--out", str(tree_dir)]) == 0
    capsys.readouterr()
    assert load_manifest(reference).name == "reference"

    def tree(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}

    fresh, old = tree(tree_dir), tree(REPO / "kustomize")
    assert sorted(fresh) == sorted(old), "file set differs: re-run `make render` and commit kustomize/"
    stale = [p for p in fresh if fresh[p] != old[p]]
    assert not stale, f"stale files in kustomize/: {stale}; re-run `make render` and commit"


def test_prod_overlay_scales_each_stage_by_its_measured_cost() -> None:
    """The committed prod overlay's autoscalers and CPU come from the plan: the reference's 17 ms stage gets
    more replicas than its 0.02 ms stage, which asks for a tenth of a core."""
    prod = REPO / "kustomize/overlays/prod"
    floors = {}
    for stage in range(4):
        hpa = yaml.safe_load((prod / f"horizontalpodautoscaler-reference-stage-{stage}-v1.yaml").read_text())
        floors[stage] = hpa["spec"]["minReplicas"]
    manifest = load_manifest(REPO / "examples/reference")
    costs = {i: s.cost.latency_ms for i, s in enumerate(manifest.stages)}
    dearest, cheapest = max(costs, key=costs.__getitem__), min(costs, key=costs.__getitem__)
    assert floors[dearest] > floors[cheapest]
    cheap = yaml.safe_load((REPO / f"kustomize/base/deployment-reference-stage-{cheapest}-v1.yaml").read_text())
    assert cheap["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "100m"


def test_pods_drain_before_they_are_killed(tiny_pipeline: tuple[Path, Manifest]) -> None:
    """preStop waits for the pod to leave every caller's endpoints; the grace period covers that wait and the
    app's own drain (STAGE_TIMEOUT_S + 5 s); the sidecar stays until its last connection is done."""
    _, manifest = tiny_pipeline
    for d in _by_kind(render_tree(manifest, Policy()), "base/")["Deployment"]:
        pod = d["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        app_drain = int(float(env.get("STAGE_TIMEOUT_S", "30"))) + 5
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0
        assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + app_drain
        proxy = yaml.safe_load(pod["metadata"]["annotations"]["proxy.istio.io/config"])
        assert proxy["proxyMetadata"] == {"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true"}
        assert proxy["terminationDrainDuration"] == f"{pre_stop + app_drain}s"


def test_gateway_routes_grpc_to_the_first_stage_retrying_grpc_codes(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    (vs,) = [v for v in _by_kind(render_tree(manifest, Policy()), "components/istio/")["VirtualService"]
             if v["metadata"]["name"] == f"{manifest.name}-gateway"]
    rest, grpc = vs["spec"]["http"]
    assert grpc["match"] == [{"uri": {"prefix": "/inference.GRPCInferenceService/"}}]
    assert rest["match"] == [{"uri": {"exact": "/v2/models/tiny"}}, {"uri": {"prefix": "/v2/models/tiny/"}},
                             {"uri": {"prefix": "/v2/health/"}}]
    assert {d["destination"]["port"]["number"] for d in grpc["route"]} == {8081}
    assert {d["destination"]["host"] for d in grpc["route"]} == {d["destination"]["host"] for d in rest["route"]}
    retry_on = set(grpc["retries"]["retryOn"].split(","))
    assert {"unavailable", "cancelled"} <= retry_on and not retry_on & {"invalid-argument", "resource-exhausted"}
    assert grpc["timeout"] == rest["timeout"]


def test_canary_of_the_first_stage_splits_grpc_as_rest(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    first = manifest.stages[0].name
    files = render_tree(manifest, _policy(stages={first: {"versions": [{"name": "v1", "weight": 70},
                                                                       {"name": "v2", "weight": 30}]}}))
    ops = _docs(files[f"overlays/canary/patch-virtualservice-{manifest.name}-gateway.yaml"])[0]
    assert [op["path"] for op in ops] == ["/spec/http/0/route", "/spec/http/1/route"]
    rest, grpc = (op["value"] for op in ops)
    assert [(d["destination"]["subset"], d["weight"]) for d in grpc] == [("v1", 70), ("v2", 30)]
    assert [d["destination"]["subset"] for d in rest] == [d["destination"]["subset"] for d in grpc]
    assert {d["destination"]["port"]["number"] for d in grpc} == {8081}
    assert {d["destination"]["port"]["number"] for d in rest} == {8080}


def test_gateway_is_https_and_requires_a_token(tiny_pipeline: tuple[Path, Manifest]) -> None:
    """The Gateway serves HTTPS only (443, SIMPLE, the policy's Secret); a RequestAuthentication and a DENY of
    requests without a token's principal sit on the ingress gateway, scoped to the pipeline's host and its model
    and gRPC paths; health is left open."""
    _, manifest = tiny_pipeline
    files = render_tree(manifest, _policy(gateway={
        "host": "tiny.example.com", "tls": {"credential_name": "tiny-tls"},
        "auth": {"issuer": "https://idp.example.com", "audiences": ["tiny", "ops"],
                 "jwks_uri": "https://idp.example.com/keys"}}))
    istio = _by_kind(files, "components/")
    [server] = istio["Gateway"][0]["spec"]["servers"]
    assert server["port"] == {"number": 443, "name": "https", "protocol": "HTTPS"}
    assert server["tls"] == {"mode": "SIMPLE", "credentialName": "tiny-tls"}
    [authn] = istio["RequestAuthentication"]
    assert authn["metadata"]["namespace"] == "istio-system"
    assert authn["spec"]["selector"] == {"matchLabels": {"istio": "ingressgateway"}}
    assert authn["spec"]["jwtRules"] == [{"issuer": "https://idp.example.com", "audiences": ["tiny", "ops"],
                                          "jwksUri": "https://idp.example.com/keys"}]
    [deny] = [p for p in istio["AuthorizationPolicy"] if p["metadata"]["name"] == "tiny-require-token"]
    assert deny["metadata"]["namespace"] == "istio-system" and deny["spec"]["action"] == "DENY"
    [rule] = deny["spec"]["rules"]
    assert rule["from"] == [{"source": {"notRequestPrincipals": ["*"]}}]
    assert rule["to"] == [{"operation": {"ports": ["8443"], "hosts": ["tiny.example.com", "tiny.example.com:*"],
                                         "paths": ["/v2/models/tiny", "/v2/models/tiny/*",
                                                   "/inference.GRPCInferenceService/*"]}}]
    buffer = render_tree(manifest, _policy(defaults={"buffer_limit_bytes": 4 << 20}))
    first = yaml.safe_load(buffer[f"components/istio/envoyfilter-{manifest.stages[0].name}-buffer-limit.yaml"])
    assert first["spec"]["configPatches"][0]["match"]["listener"] == {"portNumber": 8443}  # the HTTPS listener


def test_inline_keys_and_auth_off(tiny_pipeline: tuple[Path, Manifest]) -> None:
    _, manifest = tiny_pipeline
    keys = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}]})
    files = render_tree(manifest, _policy(gateway={"auth": {"jwks": keys}}))
    [authn] = _by_kind(files, "components/")["RequestAuthentication"]
    assert authn["spec"]["jwtRules"][0]["jwks"] == keys and "jwksUri" not in authn["spec"]["jwtRules"][0]
    off = _by_kind(render_tree(manifest, _policy(gateway={"auth": {"enabled": False}})), "components/")
    assert "RequestAuthentication" not in off
    assert "tiny-require-token" not in [p["metadata"]["name"] for p in off["AuthorizationPolicy"]]
    assert off["Gateway"][0]["spec"]["servers"][0]["port"]["protocol"] == "HTTPS"  # TLS stays
