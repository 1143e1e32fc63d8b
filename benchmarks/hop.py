"""`make bench-hop`: what one hop between stage processes costs, binary against JSON, on loopback.

Two real stage processes serve a pipeline `hop`: stage A is an identity (a -> b, FP32 [1, N]) and forwards
b to stage B exactly as any stage forwards to the next; B reduces b to its mean (c, [1, 1]), so the answer
coming back is small, as a pipeline's final output usually is. Activations flow forward only, so a hop moves
the activation once. For activations of about 4 KB, 0.7 MB and 3 MB:

- hop, binary / JSON: a client sends the activation to B and reads B's small answer, encoded with this
  package's own codec (the one stages use to talk to each other), minus B's onnxruntime time (from
  `x-stage-timing`): encode, send, receive and decode the activation, plus the small answer's round trip.
- added stage (binary, as served): latency(client -> A -> B) - latency(client -> B) - A's onnxruntime time,
  requests interleaved: what one more stage in the chain adds, i.e. one more binary hop of the activation
  plus a stage process's own request handling. Stages only ever forward binary: no JSON counterpart.

- floor: the same binary body from the same client to a bare uvicorn ASGI app that reads it and answers
  two bytes: what uvicorn, httpx and loopback cost with no stage code at all.

- transports (`benchmarks.transports`): the raw-socket floor (asyncio streams, 8-byte length prefix) and every
  server + client candidate for the hop, 0.8 and 3.2 MB, requests interleaved, as ratios to that floor.

Percentiles of the added stage are over paired differences (each chain request minus the direct request
sent right after it), so noise from other processes on the machine widens its p99. Writes `bench-hop.json` and
`bench-hop.png` to --out and prints a table. Needs the dev extras (onnx, matplotlib); not used in serving.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import transports
from loadtest.machine import describe
from stage_service.chain import TIMING_HEADER
from stage_service.launch import HOST, StageProcess, free_port, start_stage
from stage_service.protocol import HEADER_LENGTH, decode_response, encode_json_request, encode_request
from stage_service.supervisor import Child, http_ready, wait_ready

SIZES = {"4 KB": 1024, "0.7 MB": 175_000, "3 MB": 750_000}  # FP32 elements


def write_identity_pipeline(directory: Path) -> Path:
    """pipeline.json + stage A (identity, FP32 [1, -1]) and stage B (mean, [1, 1]); returns the manifest path."""
    from onnx import TensorProto, helper

    from model_export.manifest import MANIFEST_FILE
    from model_export.pipeline_writer import write_pipeline

    names = ["a", "b", "c"]
    nodes = [helper.make_node("Identity", ["a"], ["b"]), helper.make_node("ReduceMean", ["b"], ["c"], axes=[1])]
    out_shapes: list[list[int | str]] = [[1, "n"], [1, 1]]
    stages = []
    for i in range(2):
        graph = helper.make_graph(
            [nodes[i]], f"hop{i}",
            [helper.make_tensor_value_info(names[i], TensorProto.FLOAT, [1, "n"])],
            [helper.make_tensor_value_info(names[i + 1], TensorProto.FLOAT, out_shapes[i])],
        )
        stages.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    # the whole model is never consulted by the hop bench; the first stage stands in for it
    write_pipeline(directory, "hop", stages, directory / "stage-0.onnx")
    return directory / MANIFEST_FILE


def _start(manifest: Path, name: str, next_url: str | None, log_dir: Path) -> StageProcess:
    return start_stage(manifest, name, next_url=next_url, log_dir=log_dir,
                       env={"STAGE_MAX_REQUEST_BYTES": str(256 << 20)})


async def _floor_app(scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
    """Bare ASGI app: reads the whole body, answers 2 bytes. The transport floor under every stage."""
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve_floor(port: int) -> None:
    import uvicorn

    uvicorn.run(_floor_app, host=HOST, port=port, loop="uvloop", http="httptools", log_level="warning",
                lifespan="off")


def _start_floor(log: Path) -> tuple[Child, str]:
    port = free_port()
    floor = Child.start("floor server", [sys.executable, "-m", "benchmarks.hop", "--serve-floor", str(port)], log)
    url = f"http://{HOST}:{port}"
    try:
        wait_ready([floor.target(http_ready(url))], timeout=60)
    except BaseException:
        floor.stop(signal.SIGKILL)
        raise
    return floor, url


def _floor_call(client: httpx.Client, url: str, x: np.ndarray) -> Call:
    def call() -> tuple[float, httpx.Response]:
        start = time.perf_counter()
        body, length = encode_request({"b": x})
        r = client.post(url, content=body, headers={HEADER_LENGTH: str(length)})
        elapsed = time.perf_counter() - start
        assert r.status_code == 200 and r.content == b"ok"
        return elapsed * 1000.0, r
    return call


def _stage_ms(response: httpx.Response, index: int) -> float:
    return float(response.headers[TIMING_HEADER].split(",")[index].split("=")[1])


Call = Callable[[], tuple[float, httpx.Response]]


def _binary_call(client: httpx.Client, url: str, model: str, x: np.ndarray, input_name: str) -> Call:
    def call() -> tuple[float, httpx.Response]:
        start = time.perf_counter()
        body, length = encode_request({input_name: x})
        r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers={HEADER_LENGTH: str(length)})
        _, out = decode_response(r.content, r.headers.get(HEADER_LENGTH))
        elapsed = time.perf_counter() - start
        assert r.status_code == 200 and out["c"].shape == (1, 1), r.text[:300]
        return elapsed * 1000.0, r
    return call


def _json_call(client: httpx.Client, url: str, model: str, x: np.ndarray, input_name: str) -> Call:
    def call() -> tuple[float, httpx.Response]:
        start = time.perf_counter()
        body = encode_json_request({input_name: x})
        r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers={"content-type": "application/json"})
        _, out = decode_response(r.content, r.headers.get(HEADER_LENGTH))
        elapsed = time.perf_counter() - start
        assert r.status_code == 200 and out["c"].shape == (1, 1), r.text[:300]
        return elapsed * 1000.0, r
    return call


def _pcts(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "n": len(values)}


def run_bench(out: Path, runs: int = 200, json_runs: int = 30, warmup: int = 10,
              transport_runs: int = 100) -> dict[str, Any]:
    """Start the two stage processes, measure every size, write the JSON and the plot; return the results."""
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-hop-"))
    manifest = write_identity_pipeline(work / "hop")
    stage_b = _start(manifest, "hop-stage-1", None, work)
    procs: list[Child] = [stage_b]
    results: dict[str, Any] = {}
    try:
        stage_a = _start(manifest, "hop-stage-0", stage_b.url, work)
        procs.append(stage_a)
        floor_server, url_floor = _start_floor(work / "floor.log")
        procs.append(floor_server)
        url_a, url_b = stage_a.url, stage_b.url
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=120) as client:
            for label, n in SIZES.items():
                x = rng.standard_normal((1, n)).astype(np.float32)
                chain = _binary_call(client, url_a, "hop", x, "a")
                direct = _binary_call(client, url_b, "hop-stage-1", x, "b")
                as_json = _json_call(client, url_b, "hop-stage-1", x, "b")
                floor = _floor_call(client, url_floor, x)
                for _ in range(warmup):
                    chain(), direct(), as_json(), floor()
                chain_ms, direct_ms, hop_bin, infer_a, floor_ms = [], [], [], [], []
                for _ in range(runs if n < 500_000 else max(runs // 2, 20)):
                    ms, r = chain()
                    chain_ms.append(ms)
                    infer_a.append(_stage_ms(r, 0))
                    ms, r = direct()
                    direct_ms.append(ms)
                    hop_bin.append(ms - _stage_ms(r, 0))
                    floor_ms.append(floor()[0])
                hop_json = []
                for _ in range(json_runs if n >= 100_000 else runs):
                    ms, r = as_json()
                    hop_json.append(ms - _stage_ms(r, 0))
                c, d, ia = _pcts(chain_ms), _pcts(direct_ms), _pcts(infer_a)
                # Paired: each chain request minus the direct request right after it, minus A's inference.
                added = _pcts([ch - di - a for ch, di, a in zip(chain_ms, direct_ms, infer_a, strict=True)])
                results[label] = {
                    "bytes": x.nbytes,
                    "hop_binary_ms": _pcts(hop_bin),
                    "hop_json_ms": _pcts(hop_json),
                    "added_stage_binary_ms": added,
                    "transport_floor_ms": _pcts(floor_ms),
                    "chain_ms": c,
                    "direct_ms": d,
                    "inference_a_ms": ia,
                }
                results[label]["json_over_binary_p50"] = (
                    results[label]["hop_json_ms"]["p50"] / max(results[label]["hop_binary_ms"]["p50"], 1e-9)
                )
    finally:
        for proc in procs:
            proc.send(signal.SIGTERM)
        for proc in procs:
            proc.stop()
    load_before = os.getloadavg()[0]
    candidates = transports.run(work, runs=transport_runs)
    report = {
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "description": describe(),
                    "load_average": [load_start, os.getloadavg()[0]]},
        "method": __doc__,
        "sizes": results,
        "transports": {"load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                       "sizes": candidates},
    }
    (out / "bench-hop.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "bench-hop.png")
    return report


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    series = [("floor (bare uvicorn)", "transport_floor_ms"), ("hop, binary", "hop_binary_ms"),
              ("hop, JSON", "hop_json_ms"), ("added stage (binary, as served)", "added_stage_binary_ms")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    for i, (name, key) in enumerate(series):
        p50 = [max(results[s][key]["p50"], 1e-3) for s in labels]
        p99 = [max(results[s][key]["p99"], 1e-3) for s in labels]
        xs = [j + (i - 1.5) * width for j in range(len(labels))]
        ax.bar(xs, p50, width, label=f"{name} p50")
        ax.scatter(xs, p99, marker="_", s=200, color="black", zorder=3, label="p99" if i == 0 else None)
    ax.axhline(2.0, color="red", linestyle=":", linewidth=1, label="target: binary 3 MB hop p50 2 ms")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("activation size (FP32)")
    ax.set_ylabel("milliseconds (log)")
    ax.set_title("Per-hop overhead between stage processes on loopback")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"per-hop overhead, ms ({report['machine']['machine']}, {report['machine']['cpus']} CPUs)")
    for column in ("size", "binary p50", "binary p99", "JSON p50", "JSON p99", "JSON/bin", "+stage p50",
                   "+stage p99", "floor p50"):
        table.add_column(column, justify="right", no_wrap=True)
    table.caption = ("binary/JSON: one hop, client -> B; +stage: (client -> A -> B) - (client -> B), binary; "
                     "floor: the same binary body to a bare uvicorn app")
    for label, r in report["sizes"].items():
        table.add_row(
            label, f"{r['hop_binary_ms']['p50']:.3f}", f"{r['hop_binary_ms']['p99']:.3f}",
            f"{r['hop_json_ms']['p50']:.1f}", f"{r['hop_json_ms']['p99']:.1f}", f"{r['json_over_binary_p50']:.0f}x",
            f"{r['added_stage_binary_ms']['p50']:.3f}", f"{r['added_stage_binary_ms']['p99']:.3f}",
            f"{r['transport_floor_ms']['p50']:.3f}",
        )
    Console(width=160).print(table)
    if report.get("transports"):
        print("transport candidates (ms; ratio to the raw-socket floor):")
        print("\n".join(transports.markdown(report["transports"]["sizes"])))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("description") or f"{m['machine']}, {m['cpus']} CPUs"
    if "load_average" in m:
        start, end = m["load_average"]
        where += f", load average (1 min) {start:.1f} at the start, {end:.1f} at the end"
    lines = ["## Per-hop overhead (make bench-hop)", "",
             f"Measured on {where}; milliseconds. binary/JSON: one hop, client -> B; "
             "+stage: (client -> A -> B) - (client -> B), binary; floor: the same binary body to a bare uvicorn app. "
             "Method and targets: README, Performance.", "",
             "| activation | binary p50 | binary p99 | JSON p50 | JSON p99 | JSON / binary | +stage p50 | +stage p99 "
             "| floor p50 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in report["sizes"].items():
        lines.append(
            f"| {label} | {r['hop_binary_ms']['p50']:.3f} | {r['hop_binary_ms']['p99']:.3f} | "
            f"{r['hop_json_ms']['p50']:.1f} | {r['hop_json_ms']['p99']:.1f} | {r['json_over_binary_p50']:.1f}x | "
            f"{r['added_stage_binary_ms']['p50']:.3f} | {r['added_stage_binary_ms']['p99']:.3f} | "
            f"{r['transport_floor_ms']['p50']:.3f} |")
    t = report.get("transports")
    if t:
        lines += ["", "### Transport candidates for the hop, against the raw-socket floor", "",
                  f"One hop, body of N bytes, server answering 2 bytes; floor: raw asyncio streams with an 8-byte "
                  f"length prefix; the HTTP servers serve the same FastAPI app (uvicorn-stage: uvicorn with the "
                  f"stage's own protocol, `server.StageHttpProtocol`); clients async on uvloop (http1: "
                  f"`stage_service.http1`); "
                  f"{t['sizes'][next(iter(t['sizes']))]['floor']['n']} requests per candidate and size, interleaved. "
                  f"Load average (1 min) {t['load_average_before']:.1f} before, {t['load_average_after']:.1f} after: "
                  "only the ratios within this run mean anything.", ""]
        lines += transports.markdown(t["sizes"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hop",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench-hop"))
    parser.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--runs", type=int, default=200, help="binary requests per size and path")
    parser.add_argument("--json-runs", type=int, default=30, help="JSON requests at 0.7 MB and 3 MB")
    parser.add_argument("--transport-runs", type=int, default=100, help="requests per transport candidate and size")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        _serve_floor(args.serve_floor)
        return 0
    report = run_bench(args.out, runs=args.runs, json_runs=args.json_runs, transport_runs=args.transport_runs)
    print_table(report)
    from benchmarks.sections import update_section

    update_section(args.benchmarks, "bench-hop", markdown(report))
    print(f"wrote {args.out / 'bench-hop.json'}, {args.out / 'bench-hop.png'} and its section of {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
