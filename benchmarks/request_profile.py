"""Where one request's time goes (issue 15, item 2): per stage, its inference, the rest of its own work (decode,
encode, its HTTP server and its client to the next stage) and the hop into it (the sockets; through the mesh
also Envoy and TLS), directly chained and through the local mesh.

Everything but decode and encode comes from the stages' own metrics over `requests` sequential requests (batch
1): `stage_request_duration_seconds` (from its first byte to its answer, the rest of the chain included),
`stage_inference_duration_seconds` and `stage_downstream_duration_seconds` (the call to the next stage). The
hop into stage k is the caller's time for the call (the client's for stage 0, else stage k-1's downstream)
less stage k's own request time. Decode and encode are the same protocol functions timed in-process on the
same tensors (the chain's values for the profiled input).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loadtest.workload import Access
from model_export.manifest import Manifest
from model_export.verify import Chain, pipeline_inputs
from stage_service import protocol

METRICS = {"request": "stage_request_duration_seconds", "inference": "stage_inference_duration_seconds",
           "downstream": "stage_downstream_duration_seconds"}

Scrape = Callable[[], str]


def metric_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per metric of `METRICS`, from one /metrics page (every label set added up)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return {key: (samples.get(f"{name}_sum", 0.0), samples.get(f"{name}_count", 0.0)) for key, name in METRICS.items()}


def scraper(url: str | None = None, uds: str | None = None) -> Scrape:
    """A stage app's /metrics, over TCP (`url`) or its Unix socket (`uds`: the local mesh's apps)."""
    client = httpx.Client(transport=httpx.HTTPTransport(uds=uds)) if uds else httpx.Client()
    base = url or "http://stage"
    return lambda: client.get(f"{base}/metrics", timeout=10).raise_for_status().text


def _time_ms(run: Callable[[], object], repeat: int = 30) -> float:
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    return float(np.median(samples))


def codec_ms(pipeline: Path, manifest: Manifest) -> list[dict[str, float]]:
    """Per stage: decoding its binary request and encoding its outputs for the next one (the answer for the
    last stage), in-process, ms."""
    values = Chain(pipeline, manifest, threads=1).run_all(pipeline_inputs(manifest, 1, 0))
    rows = []
    for stage in manifest.stages:
        body, length = protocol.encode_request({t.name: values[t.name] for t in stage.inputs})
        outputs = {t.name: values[t.name] for t in stage.outputs}
        rows.append({"decode_ms": _time_ms(partial(protocol.decode_request, body, str(length))),
                     "encode_ms": _time_ms(partial(protocol.encode_request_parts, outputs))})
    return rows


def profile(entry_url: str, manifest: Manifest, scrapes: list[Scrape], requests: int = 100,
            access: Access | None = None) -> list[dict[str, float]]:
    """Per stage, mean ms over `requests` sequential requests: hop into it, its own work, its inference."""
    body, headers = protocol.request_body(pipeline_inputs(manifest, 1, 0))
    if access is not None and access.token:
        headers = {**headers, "authorization": f"Bearer {access.token}"}
    verify: Any = str(access.ca) if access is not None and access.ca else True
    url = f"{entry_url}/v2/models/{manifest.name}/infer"
    with httpx.Client(verify=verify, timeout=60) as client:
        for _ in range(10):  # warm connections, caches and onnxruntime
            client.post(url, content=body, headers=headers).raise_for_status()
        before = [metric_totals(scrape()) for scrape in scrapes]
        start = time.perf_counter()
        for _ in range(requests):
            client.post(url, content=body, headers=headers).raise_for_status()
        client_ms = (time.perf_counter() - start) * 1000 / requests
        after = [metric_totals(scrape()) for scrape in scrapes]
    means = []
    for b, a in zip(before, after, strict=True):
        means.append({key: (a[key][0] - b[key][0]) * 1000 / max(a[key][1] - b[key][1], 1) for key in METRICS})
    rows = []
    for k, m in enumerate(means):
        caller_ms = client_ms if k == 0 else means[k - 1]["downstream"]
        rows.append({"hop_in_ms": caller_ms - m["request"], "own_ms": m["request"] - m["inference"] - m["downstream"],
                     "inference_ms": m["inference"], "client_ms": client_ms})
    return rows


def markdown(stage_names: list[str], codec: list[dict[str, float]], direct: list[dict[str, float]],
             meshed: list[dict[str, float]] | None) -> list[str]:
    head = ["| stage | hop into it, direct | hop into it, mesh | Envoy + TLS on that hop | own work | of which decode "
            "| of which encode | inference |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for k, name in enumerate(stage_names):
        d, c = direct[k], codec[k]
        mesh_hop = f"{meshed[k]['hop_in_ms']:.2f}" if meshed else "-"
        envoy = f"{meshed[k]['hop_in_ms'] - d['hop_in_ms']:.2f}" if meshed else "-"
        rows.append(f"| {name} | {d['hop_in_ms']:.2f} | {mesh_hop} | {envoy} | {d['own_ms']:.2f} | "
                    f"{c['decode_ms']:.2f} | {c['encode_ms']:.2f} | {d['inference_ms']:.2f} |")
    totals = {"hop": sum(r["hop_in_ms"] for r in direct), "own": sum(r["own_ms"] for r in direct),
              "inference": sum(r["inference_ms"] for r in direct)}
    mesh_total = f"{sum(r['hop_in_ms'] for r in meshed):.2f}" if meshed else "-"
    envoy_total = f"{sum(r['hop_in_ms'] for r in meshed) - totals['hop']:.2f}" if meshed else "-"
    rows.append(f"| all stages | {totals['hop']:.2f} | {mesh_total} | {envoy_total} | {totals['own']:.2f} | "
                f"{sum(c['decode_ms'] for c in codec):.2f} | {sum(c['encode_ms'] for c in codec):.2f} | "
                f"{totals['inference']:.2f} |")
    return head + rows
