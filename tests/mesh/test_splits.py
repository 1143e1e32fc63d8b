"""Split-version pinning's plan (mesh.splits) and the Envoy routes written from it, without processes: split
ids, the policy's `splits`, the gateway's assignment by weight, and the header matches of every hop."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import envoy_config
from mesh.layout import plan as plan_layout
from mesh.policy import Policy, PolicyError
from mesh.splits import HEADER, Pinning, resolve_pinning
from model_export.manifest import load_manifest
from model_export.split import split_model
from model_export.stage_version import write_stage_version
from tests.tiny import dense_stage_graph, write_tiny_pipeline


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("splits")
    write_tiny_pipeline(tmp / "three", name="pin")
    split_model(tmp / "three" / "model.onnx", tmp / "two", stages=2, cuts=["h2"], name="pin", runs=1)
    write_stage_version(tmp / "three", tmp / "retrained", "pin-stage-1", dense_stage_graph(1, "h1", "h2", 32, 24, 7))
    write_tiny_pipeline(tmp / "other", name="other")
    return {"3": tmp / "three", "2": tmp / "two", "retrained": tmp / "retrained", "other": tmp / "other"}


def _pinning(splits: dict[str, Path], entries: list[dict[str, object]], running: str = "3",
             **policy: object) -> Pinning:
    pinning = resolve_pinning(Policy.model_validate({"splits": entries, **policy}), load_manifest(splits[running]),
                              splits[running], None)
    assert pinning is not None
    return pinning


def test_split_id_follows_the_cuts_only(splits: dict[str, Path]) -> None:
    three, two, retrained = (load_manifest(splits[k]) for k in ("3", "2", "retrained"))
    assert three.split_id.startswith("s3-") and two.split_id.startswith("s2-") and three.split_id != two.split_id
    assert retrained.stage("pin-stage-1").sha256 != three.stage("pin-stage-1").sha256
    assert retrained.split_id == three.split_id  # a retrained stage fits where the old one did


def test_assignments_are_whole_percents_of_split_and_version_weights(splits: dict[str, Path]) -> None:
    stage_canary = {"pin-stage-0": {"versions": [{"name": "v1", "weight": 75}, {"name": "v2", "weight": 25}]}}
    pinning = _pinning(splits, [{"pipeline": str(splits["3"]), "weight": 90},
                                {"pipeline": str(splits["2"]), "weight": 10}], stages=stage_canary)
    three, two = pinning.names
    got = {(a.split, a.version): a.weight for a in pinning.assignments()}
    assert got == {(three, "v1"): 68, (three, "v2"): 22, (two, "v1"): 10}  # 67.5 and 22.5: one rounds up
    assert sum(got.values()) == 100
    assert pinning.unassigned_hop().route.timeout_s == 15.0  # the 3-stage split's: it covers the 2-stage one's 10
    assert three in pinning.refusal() and two in pinning.refusal()


@pytest.mark.parametrize(("entries", "words"), [
    ([{"pipeline": "3", "weight": 60}, {"pipeline": "2", "weight": 30}], "split weights must sum to 100"),
    ([{"pipeline": "2", "weight": 100}], "the pipeline the mesh runs"),
    ([{"pipeline": "3", "weight": 50}, {"pipeline": "retrained", "weight": 50}], "have the same cuts"),
    ([{"pipeline": "3", "weight": 50}, {"pipeline": "other", "weight": 50}], "is not a split of 'pin'"),
    ([{"pipeline": "3", "weight": 50}, {"pipeline": "nowhere", "weight": 50}], "no manifest here"),
])
def test_bad_splits_are_one_error_naming_the_problem(splits: dict[str, Path], entries: list[dict[str, object]],
                                                     words: str) -> None:
    given = [{**e, "pipeline": str(splits.get(str(e["pipeline"]), splits["3"].parent / str(e["pipeline"])))}
             for e in entries]
    with pytest.raises((PolicyError, ValueError)) as exc:
        _pinning(splits, given)
    assert words in str(exc.value)


def _routes(resources: envoy_config.Resources, name: str) -> list[dict[str, object]]:
    route = next(r for r in resources.routes if r["name"] == name)
    return list(route["virtual_hosts"][0]["routes"])


def test_every_hop_routes_on_the_header(splits: dict[str, Path], tmp_path: Path) -> None:
    pinning = _pinning(splits, [{"pipeline": str(splits["3"]), "weight": 70},
                                {"pipeline": str(splits["2"]), "weight": 30}])
    three, two = pinning.splits
    layouts = {s.name: plan_layout(s.plan, "pin", Path(s.pipeline_dir), 0, socket_dir=tmp_path)
               for s in pinning.splits}
    layouts[two.name] = layouts[two.name].model_copy(update={"split": two.name})
    cert = envoy_config.CertPair(tmp_path / "c.pem", tmp_path / "k.pem")
    gateway = envoy_config.gateway(layouts[three.name], three.plan, cert, tmp_path, tmp_path,
                                   envoy_config.ClientSide(cert, tmp_path / "jwks.json"), pinning, layouts)
    first = _routes(gateway, "gateway")[:4]  # the first gateway path: two splits, the refusal, the assignment
    assert [r["match"].get("headers") for r in first] == [
        [{"name": HEADER, "string_match": {"exact": three.name}}],
        [{"name": HEADER, "string_match": {"exact": two.name}}],
        [{"name": HEADER, "present_match": True}], None]
    assert first[0]["route"]["cluster"] == "outbound|v1|pin-stage-0"
    assert first[1]["route"]["cluster"] == f"outbound|{two.name}-v1|pin-stage-0"
    assert first[2]["direct_response"]["status"] == 400
    assigned = first[3]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"], c["request_headers_to_add"][0]["header"]["value"]) for c in assigned] == [
        ("outbound|v1|pin-stage-0", 70, three.name), (f"outbound|{two.name}-v1|pin-stage-0", 30, two.name)]
    replica = layouts[two.name].replicas[0]
    sidecar = envoy_config.sidecar(layouts[two.name], two.plan, replica, cert, tmp_path, tmp_path, two.name)
    headers = [(h, r) for r in _routes(sidecar, "outbound") for h in r["match"].get("headers", [])]
    assert {h["string_match"]["exact"] for h, _ in headers if "string_match" in h} == {two.name}
    assert all(r["direct_response"]["status"] == 400 for h, r in headers if "present_match" in h)
    assert all(c["name"].startswith(f"outbound|{two.name}-") for c in sidecar.clusters if "outbound|" in c["name"])

