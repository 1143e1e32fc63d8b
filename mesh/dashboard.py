"""A Grafana dashboard for one pipeline: the pipeline's and each stage's rate, latency and errors.

Built from Istio's standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds_bucket`,
reported by the sidecars and the ingress gateway) and the stage service's own (`stage_*`), scraped with
the pod labels `app`, `version` and `namespace` that Istio's Prometheus addon maps onto every series.
The output is plain JSON, deterministic: panel ids and positions follow the stage order.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.plan import Plan

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def _panel(pid: int, title: str, unit: str, targets: list[dict[str, Any]], x: int, y: int,
           w: int = 8) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "id": pid,
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": targets,
        "title": title,
        "type": "timeseries",
    }


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": pid, "panels": [],
            "title": title, "type": "row"}


def build_dashboard(pipeline: str, resolved: Plan) -> dict[str, Any]:
    """The dashboard as a dict (Grafana schema 39)."""
    ns = resolved.namespace
    first = resolved.stages[0].name
    entry = f'reporter="source",destination_workload_namespace="{ns}",destination_app="{first}"'
    panels: list[dict[str, Any]] = [_row(1, f"Pipeline {pipeline} (at the ingress gateway)", 0)]
    panels.append(_panel(2, "Requests per second", "reqps", [
        _target(f"sum by (response_code) (rate(istio_requests_total{{{entry}}}[$__rate_interval]))",
                "{{response_code}}", "A"),
    ], 0, 1))
    panels.append(_panel(3, "Latency percentiles", "ms", [
        _target(f"histogram_quantile({q}, sum by (le) "
                f"(rate(istio_request_duration_milliseconds_bucket{{{entry}}}[$__rate_interval])))",
                f"p{int(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ], 8, 1))
    panels.append(_panel(4, "Errors (share of requests, 5xx)", "percentunit", [
        _target(f'sum(rate(istio_requests_total{{{entry},response_code=~"5.."}}[$__rate_interval])) / '
                f"sum(rate(istio_requests_total{{{entry}}}[$__rate_interval]))", "5xx", "A"),
    ], 16, 1))
    pid, y = 5, 9
    for stage in resolved.stages:
        mesh_sel = f'reporter="destination",destination_workload_namespace="{ns}",destination_app="{stage.name}"'
        app_sel = f'namespace="{ns}",app="{stage.name}"'
        panels.append(_row(pid, f"Stage {stage.index}: {stage.name}", y))
        panels.append(_panel(pid + 1, f"{stage.name}: requests per second by version and status", "reqps", [
            _target(f"sum by (destination_version, response_code) "
                    f"(rate(istio_requests_total{{{mesh_sel}}}[$__rate_interval]))",
                    "{{destination_version}} {{response_code}}", "A"),
            _target(f"sum by (version, code) (rate(stage_requests_total{{{app_sel}}}[$__rate_interval]))",
                    "app {{version}} {{code}}", "B"),
        ], 0, y + 1))
        panels.append(_panel(pid + 2, f"{stage.name}: latency p50/p99 (hop) and inference p99", "s", [
            *[_target(f"histogram_quantile({q}, sum by (le) (rate("
                      f"istio_request_duration_milliseconds_bucket{{{mesh_sel}}}[$__rate_interval]))) / 1000",
                      f"hop p{int(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.99, "B"))],
            _target(f"histogram_quantile(0.99, sum by (le) "
                    f"(rate(stage_request_duration_seconds_bucket{{{app_sel}}}[$__rate_interval])))",
                    "request p99", "C"),
            _target(f"histogram_quantile(0.99, sum by (le) "
                    f"(rate(stage_inference_duration_seconds_bucket{{{app_sel}}}[$__rate_interval])))",
                    "inference p99", "D"),
        ], 8, y + 1))
        panels.append(_panel(pid + 3, f"{stage.name}: errors, in flight, bytes", "short", [
            _target(f'sum(rate(istio_requests_total{{{mesh_sel},response_code=~"5.."}}[$__rate_interval]))',
                    "5xx per second", "A"),
            _target(f"sum(stage_inflight_requests{{{app_sel}}})", "in flight", "B"),
            _target(f"sum(rate(stage_request_bytes_total{{{app_sel}}}[$__rate_interval]))", "bytes in/s", "C"),
            _target(f"sum(rate(stage_response_bytes_total{{{app_sel}}}[$__rate_interval]))", "bytes out/s", "D"),
        ], 16, y + 1))
        pid += 4
        y += 9
    return {
        "annotations": {"list": []},
        "editable": True,
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["meshpipe", pipeline],
        "templating": {"list": [{
            "current": {}, "hide": 0, "label": "Prometheus", "name": "datasource", "options": [],
            "query": "prometheus", "refresh": 1, "type": "datasource",
        }]},
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "utc",
        "title": f"meshpipe: {pipeline}",
        "uid": f"meshpipe-{pipeline}"[:40],
        "version": 1,
    }


def dashboard_json(pipeline: str, resolved: Plan) -> str:
    return json.dumps(build_dashboard(pipeline, resolved), indent=2, sort_keys=True) + "\n"
