"""`mesh plan`: replicas per stage from measured costs (the arithmetic, worked by hand), the core budget, the
discrete-event model against queueing theory, and a written policy that loads, renders and validates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mesh.__main__ import main
from mesh.capacity import CapacityError, StageCapacity, best_within, plan_capacity
from mesh.capacity import CapacityPlan as Plan
from mesh.k8s_validate import IstioSchemas, validate_tree
from mesh.policy import load_policy
from mesh.render import render_tree, write_tree
from mesh.simulate import simulate
from model_export.manifest import Manifest, write_manifest
from tests.judges import istio as istio_modules
from tests.tiny import write_tiny_pipeline

LATENCIES = (2.5, 17.0, 0.02)  # ms: a cheap stage, the bottleneck, one 800x cheaper


@pytest.fixture
def measured(tmp_path: Path) -> tuple[Path, Manifest]:
    manifest = write_tiny_pipeline(tmp_path / "cap", name="cap")
    for stage, ms in zip(manifest.stages, LATENCIES, strict=True):
        stage.cost.latency_ms = ms
    write_manifest(manifest, tmp_path / "cap")
    return tmp_path / "cap", manifest


def test_replicas_cpu_and_bottleneck_by_hand(measured: tuple[Path, Manifest]) -> None:
    _, manifest = measured
    plan = plan_capacity(manifest, 100, max_utilization=0.7)
    # 100 rps x 17 ms = 1.7 cores busy; at most 70% each: ceil(2.43) = 3 replicas, each 0.57 busy -> 900m
    assert [(s.replicas, s.cpu_millicores) for s in plan.stages] == [(1, 400), (3, 900), (1, 100)]
    assert plan.bottleneck.name == "cap-stage-1"
    assert plan.cores == pytest.approx(0.4 + 2.7 + 0.1)
    assert plan.saturation_rps == pytest.approx(3 * 1000 / 17)


def test_a_core_budget_too_small_says_what_it_carries(measured: tuple[Path, Manifest]) -> None:
    _, manifest = measured
    with pytest.raises(CapacityError, match=r"100 rps needs 3.2 cores .* 2 cores carry at most 41.2 rps"):
        plan_capacity(manifest, 100, cores=2)
    best = best_within(manifest, 2)
    # one replica each on 2 cores: the 17 ms stage bounds it at 58.8 rps (the cores would carry 102), x 0.7
    assert [s.replicas for s in best.stages] == [1, 1, 1]
    assert best.target_rps == pytest.approx(1000 / 17 * 0.7)
    assert [s.replicas for s in best_within(manifest, 5).stages] == [1, 3, 1]


def test_an_unmeasured_stage_is_one_message(tmp_path: Path) -> None:
    manifest = write_tiny_pipeline(tmp_path / "raw", name="raw")
    manifest.stages[0].cost.latency_ms = 0
    with pytest.raises(CapacityError, match=r"\['raw-stage-0'\] have no measured latency"):
        plan_capacity(manifest, 10)


def test_the_simulation_agrees_with_queueing_theory() -> None:
    one = Plan(50, 0.7, [StageCapacity("s", 10.0, 1, 1)])
    # M/D/1 at 50% busy: mean wait rho / (2 mu (1 - rho)) = 5 ms, so half the requests take 10 to ~15 ms
    result = simulate(one, 50)
    assert result.throughput_rps == pytest.approx(50, rel=0.05)
    assert 10.0 <= result.p50_ms <= 15.0 < result.p99_ms
    overloaded = simulate(one, 200)  # twice what one replica can serve: it completes 100 rps
    assert overloaded.throughput_rps == pytest.approx(100, rel=0.03)
    two = Plan(150, 0.7, [StageCapacity("s", 10.0, 1, 2)])
    assert simulate(two, 150).throughput_rps == pytest.approx(150, rel=0.05)  # 2 replicas: 200 rps at most


def test_planned_policy_loads_renders_and_validates(measured: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, manifest = measured
    out = tmp_path / "mesh-plan.yaml"
    assert main(["plan", "--pipeline", str(directory), "--target-rps", "100", "--out", str(out)]) == 0
    policy = load_policy(out)
    middle = policy.stages["cap-stage-1"]
    assert middle.replicas == 3 and middle.autoscale is not None and middle.resources is not None
    assert (middle.autoscale.min_replicas, middle.autoscale.max_replicas) == (3, math.ceil(200 * 17 / 1000 / 0.7))
    assert middle.resources.cpu_millicores == 900
    files = render_tree(manifest, policy)
    hpa = next(text for name, text in files.items() if name.startswith("overlays/prod/")
               and "HorizontalPodAutoscaler" in text and "cap-stage-1" in text)
    assert "minReplicas: 3" in hpa and "maxReplicas: 5" in hpa
    assert any("cpu: 900m" in text for name, text in files.items() if name.startswith("base/"))
    write_tree(files, tmp_path / "tree")
    try:
        istio = IstioSchemas.load(istio_modules.crd_file())
    except istio_modules.GoUnavailable as missing:
        pytest.fail(f"Istio's CRDs come from its Go module: {missing}")
    problems = validate_tree(tmp_path / "tree", istio)
    assert problems and all(p == [] for p in problems.values()), problems


def test_a_base_policy_keeps_its_other_settings(measured: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, _ = measured
    base = tmp_path / "base.yaml"
    base.write_text("namespace: shop\nstages:\n  cap-stage-0:\n    timeout_s: 20\n")
    out = tmp_path / "planned.yaml"
    assert main(["plan", "--pipeline", str(directory), "--target-rps", "100", "--base", str(base), "--out",
                 str(out)]) == 0
    policy = load_policy(out)
    assert policy.namespace == "shop" and policy.stages["cap-stage-0"].timeout_s == 20
    assert policy.stages["cap-stage-0"].replicas == 1
    assert main(["plan", "--pipeline", str(directory), "--target-rps", "100", "--cores", "1"]) == 2
