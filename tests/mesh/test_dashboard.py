"""The Grafana dashboard queries only metrics (and labels) that exist.

Every metric named in a PromQL expression of `build_dashboard` must be either one that a real running
stage process exposes on /metrics (scraped after one request, so labelled series exist too) or one of
Istio's standard metrics; every label it groups or filters a `stage_*` metric by must be that metric's own
or one that Prometheus adds when it scrapes a pod (Istio's Prometheus addon maps the pod labels `app` and
`version` and adds `namespace`, `pod`), and an `istio_*` metric's labels must be Istio's standard ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.dashboard import build_dashboard
from mesh.plan import resolve
from mesh.policy import load_policy
from model_export.manifest import Manifest
from tests.stage_service.procs import StageProcess, start_stage

# https://istio.io/latest/docs/reference/config/metrics/ : HTTP/gRPC and TCP metrics, with Prometheus's
# suffixes for the histograms.
ISTIO_METRICS = frozenset(
    [f"istio_{m}" for m in ("requests_total", "request_messages_total", "response_messages_total",
                            "tcp_sent_bytes_total", "tcp_received_bytes_total", "tcp_connections_opened_total",
                            "tcp_connections_closed_total")]
    + [f"istio_{h}_{s}" for h in ("request_duration_milliseconds", "request_bytes", "response_bytes")
       for s in ("bucket", "sum", "count")]
)
ISTIO_LABELS = frozenset({
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_cluster", "source_canonical_service", "source_canonical_revision",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_cluster", "destination_canonical_service", "destination_canonical_revision", "request_protocol",
    "response_code", "grpc_response_status", "response_flags", "connection_security_policy", "le",
})
# Added to every series scraped from a pod (target labels), not exposed by the process itself.
SCRAPE_LABELS = frozenset({"namespace", "pod", "app", "version", "instance", "job"})
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                          "unless", "offset", "inf", "nan",
                          # aggregation operators, which may be followed by `by (...)` before their `(`
                          "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings first: they may hold anything
    return re.sub(r"\[[^\]]*\]", "", expr)  # range selectors such as [$__rate_interval]


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels it is filtered by) for every metric named in a PromQL expression."""
    expr = _strip(expr)
    out = []
    for m in re.finditer(r"(?<![\w:$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", expr):
        name, matchers = m.group(1), m.group(2)
        rest = expr[m.end():]
        if name in PROMQL_WORDS or (not matchers and rest.lstrip().startswith("(")):
            continue  # a keyword, function or aggregation
        if re.search(r"(by|without|on|ignoring|group_left|group_right)\s*\([^()]*$", expr[:m.start()]):
            continue  # a label inside by (...), on (...)
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        out.append((name, labels))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by (...), without (...), on (...), ignoring (...)."""
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)", _strip(expr)):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    return labels


def dashboard_exprs(manifest: Manifest) -> list[str]:
    dashboard = build_dashboard(manifest.name, resolve(load_policy(None), manifest))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def problems(exprs: list[str], exposed: dict[str, set[str]]) -> list[str]:
    """What in these expressions names a metric or label that does not exist; empty if nothing."""
    found = []
    for expr in exprs:
        selectors = metric_selectors(expr)
        if not selectors:
            found.append(f"no metric found in {expr!r}")
        for name, labels in selectors:
            if name in exposed:
                allowed: set[str] | frozenset[str] = exposed[name] | SCRAPE_LABELS | {"le"}
            elif name in ISTIO_METRICS:
                allowed = ISTIO_LABELS
            else:
                found.append(f"unknown metric {name} in {expr!r}")
                continue
            for label in (labels | grouping_labels(expr)) - allowed:
                found.append(f"{name} has no label {label!r} (in {expr!r})")
    return found


@pytest.fixture(scope="module")
def exposed(tiny_pipeline: tuple[Path, Manifest],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Sample names and their labels on a real stage's /metrics, after one inference request."""
    directory, _ = tiny_pipeline
    stage: StageProcess = start_stage(directory / "pipeline.json", "tiny-stage-2",
                                      log_dir=tmp_path_factory.mktemp("metrics-logs"))
    try:
        x = np.ones((1, 24), np.float32)
        body = {"inputs": [{"name": "h2", "datatype": "FP32", "shape": [1, 24], "data": x.ravel().tolist()}]}
        assert httpx.post(f"{stage.url}/v2/models/tiny-stage-2/infer", json=body).status_code == 200
        text = httpx.get(f"{stage.url}/metrics").text
    finally:
        assert stage.stop() == 0
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    yield samples


def test_stage_metrics_follow_prometheus_conventions(exposed: dict[str, set[str]]) -> None:
    expected = {
        "stage_requests_total": {"code"},
        "stage_request_bytes_total": set(), "stage_response_bytes_total": set(),
        "stage_inflight_requests": set(), "stage_ready": set(), "stage_info": {"pipeline", "stage", "version"},
        **{f"stage_{h}_duration_seconds_{s}": ({"le"} if s == "bucket" else set())
           for h in ("request", "inference", "downstream") for s in ("bucket", "sum", "count")},
        **{f"stage_inference_batch_size_{s}": ({"le"} if s == "bucket" else set()) for s in ("bucket", "sum", "count")},
    }
    assert exposed == expected
    for name in exposed:  # snake_case, one namespace, base units, counters end in _total
        assert re.fullmatch(r"stage_[a-z_]+", name)
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", name)


def test_dashboard_uses_only_metrics_that_exist(tiny_pipeline: tuple[Path, Manifest],
                                                exposed: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs(tiny_pipeline[1])
    named = {name for e in exprs for name, _ in metric_selectors(e)}
    assert {"istio_requests_total", "istio_request_duration_milliseconds_bucket", "stage_requests_total"} <= named
    assert problems(exprs, exposed) == []


def test_the_check_catches_unknown_metrics_and_labels(exposed: dict[str, set[str]]) -> None:
    """The parser finds what a broken dashboard would name wrongly."""
    assert metric_selectors('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="1",b=~"2"}[5m]))) / 1000') == [
        ("x_bucket", {"a", "b"})]
    assert problems(['sum(rate(stage_request_total{app="s"}[$__rate_interval]))'], exposed) == [
        "unknown metric stage_request_total in 'sum(rate(stage_request_total{app=\"s\"}[$__rate_interval]))'"]
    assert problems(["sum by (version, status) (rate(stage_requests_total[1m]))"], exposed) == [
        "stage_requests_total has no label 'status' (in 'sum by (version, status) (rate(stage_requests_total[1m]))')"]
    typo = 'sum(rate(istio_requests_total{destination_ap="x"}[1m]))'
    assert problems([typo], exposed) == [f"istio_requests_total has no label 'destination_ap' (in {typo!r})"]
    assert problems(["istio_request_duration_seconds_bucket"], exposed)
    assert problems(['sum(stage_inflight_requests{namespace="n",app="a"})'], exposed) == []
