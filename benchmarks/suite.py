"""`make bench`: the benchmark suite, one run on one machine, written to BENCHMARKS.md and JSON.

Sections (each a function returning rows, so a failure in one is reported and the rest still run):
- latency: whole model in-process, stages chained in-process, stage processes chained directly on
  loopback, and through the local Envoy mesh with mTLS: p50/p99 at batch 1 and throughput at saturation;
- equal cores: a 2-stage pipeline against the whole model in one process and against two replicas of it;
- memory: peak RSS of each stage process against the whole model's, on the large variant, 4 stages;
- batching: throughput at concurrency 16 with and without dynamic batching;
- per hop, JSON against binary, and the peers: their own benchmarks (`bench-hop`, `bench-peers`), whose
  latest results are folded in when present.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import request_profile
from benchmarks.floor_stage import floor_chain
from benchmarks.sections import update_section
from loadtest import report
from loadtest.machine import describe
from loadtest.runner import LoadSettings, closed_loop
from loadtest.workload import Access, build
from mesh.layout import Layout
from model_export.manifest import load_manifest
from model_export.ort_session import create_session
from model_export.verify import Chain, pipeline_inputs, resolve_source
from stage_service.launch import StageProcess, start_chain, stop_all

if TYPE_CHECKING:
    from mesh.local import State

SWEEP = (1, 2, 4, 8)
PAUSE_S = 0.02  # the idle before each stage of the in-process reference: a stage of the reference chain idles 20-60 ms


def _log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# ------------------------------------------------------------------------------------------ measuring


def sequential_ms(run: Callable[[], object], seconds: float) -> list[float]:
    """The milliseconds of each of the sequential calls of `run` that fit in `seconds`."""
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        begin = time.perf_counter()
        run()
        lat.append((time.perf_counter() - begin) * 1000)
    return lat


def threaded_rps(run: Callable[[], object], seconds: float, threads: int) -> float:
    """Calls of `run` a second with `threads` callers at once (onnxruntime frees the GIL)."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            run()
            done[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def http_ms(url: str, model: str, seconds: float, access: Access | None = None) -> list[float]:
    """The milliseconds of each sequential binary request in `seconds`, less the first (a new connection: its TCP
    and TLS handshakes); a request not answered 200 fails the measurement."""
    samples = asyncio.run(closed_loop(build(url, model, binary=True, access=access),
                                      LoadSettings(concurrency=1, duration_s=seconds, timeout_s=60)))
    failed = sorted({s.status for s in samples if s.status != "200"})
    if failed:
        raise RuntimeError(f"{url}: requests answered {', '.join(failed)}; expected 200")
    return [s.latency_s * 1000 for s in samples[1:]]


def paused_chain_ms(chain: Chain, feeds: dict[str, np.ndarray], pause_s: float, seconds: float) -> list[float]:
    """The milliseconds of each sequential run of `chain` in `seconds`, each stage run after `pause_s` of sleep that
    is not counted: every stage starts as a stage process of a chain at concurrency 1 does, after idling while the
    others ran (on the 2-core VM of BENCHMARKS.md work after a pause runs slower than work in a row)."""
    lat: list[float] = []
    slept = 0.0

    def pause() -> None:
        nonlocal slept
        begin = time.perf_counter()
        time.sleep(pause_s)
        slept += time.perf_counter() - begin

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        slept = 0.0
        begin = time.perf_counter()
        chain.run_all(feeds, before_each=pause)
        lat.append((time.perf_counter() - begin - slept) * 1000)
    return lat


def interleaved_ms(windows: dict[str, Callable[[float], list[float]]], seconds: float,
                   rounds: int) -> dict[str, list[float]]:
    """Each setup's latencies from `rounds` windows of seconds / rounds, the setups taking turns (the first of each
    round moving on by one): a machine whose speed moves in phases (this VM's, about half a second each) then
    slows every setup alike, where back-to-back windows of `seconds` compared one phase with another."""
    names = list(windows)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name] += windows[name](seconds / rounds)
    return out


def _closed_loops(url: str, model: str, seconds: float, sweep: tuple[int, ...],
                  access: Access | None) -> dict[int, dict[str, Any]]:
    """A 1 s warm-up, then one closed loop of `seconds` at each concurrency of `sweep`, summarized."""
    workload = build(url, model, binary=True, access=access)
    base = LoadSettings(concurrency=1, duration_s=seconds, timeout_s=60)
    asyncio.run(closed_loop(workload, replace(base, duration_s=1.0)))  # warm connections and caches
    return {c: report.summarize(asyncio.run(closed_loop(workload, replace(base, concurrency=c))), seconds)
            for c in sweep}


def over_http(url: str, model: str, seconds: float, sweep: tuple[int, ...] = SWEEP,
              access: Access | None = None) -> dict[str, Any]:
    """p50/p99 at concurrency 1 and the best throughput of a closed-loop sweep (through a gateway: with `access`)."""
    runs = _closed_loops(url, model, seconds, sweep, access)
    errors = {c: r["errors"] for c, r in runs.items() if r["errors"]}
    best = max(runs, key=lambda c: runs[c]["throughput_rps"])
    return {"p50_ms": runs[1]["latency_ms"]["p50"], "p99_ms": runs[1]["latency_ms"]["p99"],
            "throughput_rps": runs[best]["throughput_rps"], "at_concurrency": best,
            "sweep": {c: {"rps": r["throughput_rps"], "p50_ms": r["latency_ms"]["p50"]} for c, r in runs.items()},
            "errors": errors}


@contextmanager
def direct_chain(pipeline: Path, env: dict[str, str] | None = None) -> Iterator[list[StageProcess]]:
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs:
        stages = start_chain(pipeline / "pipeline.json", env=env, log_dir=Path(logs))
        try:
            yield stages
        finally:
            stop_all(stages)


@contextmanager
def running_mesh(pipeline: Path, policy: Path | None = None) -> Iterator[tuple[State, Access]]:
    """The pipeline behind the local Envoy mesh: its state (layout, processes) and the gateway's CA and a token,
    with tracing off as in the direct runs (the mesh writes every span to a file by default), so the two differ
    only by the proxies."""
    from mesh import local

    saved = os.environ.get("OTEL_SDK_DISABLED")
    os.environ["OTEL_SDK_DISABLED"] = "true"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-mesh-") as state:
            st = local.up(pipeline, policy, state_dir=Path(state), gateway_port=0)
            try:
                gateway = local.gateway_credentials(Path(state), st, "benchmarks-suite")
                yield st, Access(ca=gateway.ca, token=gateway.token)
            finally:
                local.down(Path(state))
    finally:
        if saved is None:
            os.environ.pop("OTEL_SDK_DISABLED", None)
        else:
            os.environ["OTEL_SDK_DISABLED"] = saved


@contextmanager
def local_mesh(pipeline: Path, policy: Path | None = None) -> Iterator[tuple[str, Access, Layout]]:
    """`running_mesh`, as its gateway's URL, the access to it and its layout."""
    with running_mesh(pipeline, policy) as (st, access):
        yield st.layout.gateway_url, access, st.layout


def rss_mb(pid: int) -> dict[str, float]:
    """From /proc/<pid>/status: peak (VmHWM), now (VmRSS) and now's anonymous and file-backed parts, MB."""
    keys = {"VmHWM": "peak", "VmRSS": "steady", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[keys[name]] = int(value.split()[0]) / 1024
    if "peak" not in out:
        raise RuntimeError(f"no VmHWM for pid {pid}")
    return out


def imports_rss_mb() -> float:
    """RSS of a Python that has imported what a stage process imports, and nothing loaded: the baseline."""
    import subprocess
    import sys

    code = ("import stage_service.__main__, pathlib; print([l.split()[1] for l in "
            "pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')][0])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / 1024


# ------------------------------------------------------------------------------------------- sections


def latency_section(pipeline: Path, seconds: float, rounds: int = 10) -> list[dict[str, Any]]:
    """p50/p99 at concurrency 1 of the four setups measured interleaved (`interleaved_ms`), all four up at once;
    then each setup's best throughput, one after the other. Two reference rows (`"reference": True`, after the
    four), measured in the same turns, split the loopback chain's gap over the in-process chain in two: the stages
    run in-process after the idle each stage process has between its turns (`paused_chain_ms`), and the least any
    Python stage process does (`floor_stage`); the stage service's own part is what its chain takes over that."""
    manifest = load_manifest(pipeline)
    feeds = pipeline_inputs(manifest, 1, 0)
    whole = create_session(str(resolve_source(pipeline, manifest, None)), 1)
    chain = Chain(pipeline, manifest, threads=1)
    n = len(manifest.stages)
    setups = ["whole model, in-process (1 thread/call, 2 callers for throughput)", f"{n} stages chained in-process",
              f"{n} stage processes chained on loopback (binary)",
              f"{n} stages through the Envoy mesh (gateway with TLS and a token, sidecars, mTLS)"]
    references = [f"{n} stages chained in-process, each after {PAUSE_S * 1000:g} ms idle (not counted)",
                  f"{n} floor stage processes chained on loopback (`benchmarks/floor_stage.py`)"]
    run_whole, run_chain = partial(whole.run, None, feeds), partial(chain.run, feeds)
    with (direct_chain(pipeline) as stages, local_mesh(pipeline) as (url, access, _),
          tempfile.TemporaryDirectory(prefix="bench-floor-") as logs, floor_chain(pipeline, Path(logs)) as floor):
        for _ in range(3):
            run_whole()
            run_chain()
        _log(f"latency of the four setups and two references, interleaved: {rounds} rounds of "
             f"{2 * seconds / rounds:.1f} s each")
        lat = interleaved_ms({
            setups[0]: partial(sequential_ms, run_whole),
            setups[1]: partial(sequential_ms, run_chain),
            setups[2]: lambda s: http_ms(stages[0].url, manifest.name, s),
            setups[3]: lambda s: http_ms(url, manifest.name, s, access),
            references[0]: partial(paused_chain_ms, chain, feeds, PAUSE_S),
            references[1]: lambda s: http_ms(floor, manifest.name, s),
        }, seconds * 2, rounds)
        _log("throughput: whole model, stages in-process, stage processes, mesh")
        rps = [threaded_rps(run_whole, seconds, 2), threaded_rps(run_chain, seconds, 2),
               over_http(stages[0].url, manifest.name, seconds)["throughput_rps"],
               over_http(url, manifest.name, seconds, access=access)["throughput_rps"]]
    rows: list[dict[str, Any]] = [
        {"setup": setup, "p50_ms": float(np.percentile(lat[setup], 50)), "p99_ms": float(np.percentile(lat[setup], 99)),
         "requests": len(lat[setup]), "throughput_rps": rps[k]} for k, setup in enumerate(setups)]
    direct, meshed = float(rows[2]["p50_ms"]), float(rows[3]["p50_ms"])
    # hops that gain Envoy: client->gateway->stage-0 and each stage->stage (outbound + inbound sidecar)
    rows[3]["per_hop_overhead_ms"] = (meshed - direct) / n
    return rows + [{"setup": setup, "reference": True, "p50_ms": float(np.percentile(lat[setup], 50)),
                    "p99_ms": float(np.percentile(lat[setup], 99)), "requests": len(lat[setup])}
                   for setup in references]


def envoy_overhead_section(pipeline: Path, seconds: float, runs: int = 5) -> list[dict[str, Any]]:
    """The Envoy mesh's p50 overhead per hop over direct chaining, `runs` times: the direct chain and the mesh
    both up, measured one after the other in each run (concurrency 1), so each pair sees the same machine."""
    manifest = load_manifest(pipeline)
    n = len(manifest.stages)
    rows: list[dict[str, Any]] = []
    with direct_chain(pipeline) as stages, local_mesh(pipeline) as (url, access, _):
        for run in range(1, runs + 1):
            _log(f"Envoy overhead, run {run} of {runs}")
            direct = over_http(stages[0].url, manifest.name, seconds, sweep=(1,))["p50_ms"]
            meshed = over_http(url, manifest.name, seconds, sweep=(1,), access=access)["p50_ms"]
            rows.append({"run": run, "direct_p50_ms": direct, "mesh_p50_ms": meshed,
                         "per_hop_overhead_ms": (meshed - direct) / n})
    return rows


def profile_section(pipeline: Path, requests: int = 100) -> list[dict[str, Any]]:
    """Where one request's time goes, per stage, directly chained and through the mesh (`request_profile`)."""
    manifest = load_manifest(pipeline)
    _log("profile: decode and encode in-process")
    codec = request_profile.codec_ms(pipeline, manifest)
    _log(f"profile: {requests} requests, stage processes chained directly")
    with direct_chain(pipeline) as stages:
        direct = request_profile.profile(stages[0].url, manifest,
                                         [request_profile.scraper(url=s.url) for s in stages], requests)
    _log(f"profile: {requests} requests through the local Envoy mesh")
    with local_mesh(pipeline) as (url, access, layout):
        scrapes = [request_profile.scraper(uds=layout.of_stage(s.name)[0].app_socket) for s in manifest.stages]
        meshed = request_profile.profile(url, manifest, scrapes, requests, access)
    return [{"stage": stage.name, **codec[k], "direct": direct[k], "mesh": meshed[k]}
            for k, stage in enumerate(manifest.stages)]


def ensure_split(onnx_model: Path, out: Path, stages: int) -> Path:
    """The model split into `stages` under `out` (1 stage: the whole model as one servable stage)."""
    from model_export.split import split_model

    if not (out / "pipeline.json").exists():
        _log(f"splitting {onnx_model} into {stages} stage(s) at {out}")
        split_model(onnx_model, out, stages, runs=3)
    return out


EQUAL_CORES_ROUNDS = 3


def equal_cores_section(onnx_model: Path, work: Path, seconds: float,
                        rounds: int = EQUAL_CORES_ROUNDS) -> list[dict[str, Any]]:
    """2 cores: a 2-stage pipeline (2 processes x 1 thread) vs the whole model (1 process x 2 threads) vs
    two replicas of it (2 x 1 thread) — all through the same local mesh, so each pays the same proxies.

    Throughput on this shared 2-core box moves by 10-15% from one run to the next (the whole model measured 65.8,
    76.8 and 67.8 requests/s in three runs of one day), so the setups take turns over `rounds` rounds: the first
    sweeps concurrency 1-8 (p50 at 1), the later ones repeat each setup's best concurrency, and a setup's
    throughput is the median of its rounds (every round reported)."""
    two, one = ensure_split(onnx_model, work / "split-2", 2), ensure_split(onnx_model, work / "whole", 1)
    policies: dict[str, tuple[Path, str]] = {
        "whole model, 1 process x 2 threads": (one, "defaults: {threads: 2}\n"),
        "whole model, 2 replicas x 1 thread": (one, "defaults: {replicas: 2, threads: 1}\n"),
        "2-stage pipeline, 2 processes x 1 thread": (two, "defaults: {threads: 1}\n"),
    }
    rows: dict[str, dict[str, Any]] = {}
    for round_ in range(1, rounds + 1):
        for k, (label, (pipeline, text)) in enumerate(policies.items()):
            _log(f"equal cores, round {round_} of {rounds}: {label}")
            policy = work / f"{label.split(',')[0].replace(' ', '-')}-{k}.yaml"
            policy.write_text(text)
            with local_mesh(pipeline, policy) as (url, access, _):
                model = load_manifest(pipeline).name
                if label not in rows:
                    rows[label] = {"setup": label, **over_http(url, model, seconds, access=access)}
                    rows[label]["rounds_rps"] = [rows[label]["throughput_rps"]]
                else:
                    best = rows[label]["at_concurrency"]
                    again = _closed_loops(url, model, seconds, (best,), access)[best]
                    rows[label]["rounds_rps"].append(again["throughput_rps"])
                    if again["errors"]:
                        rows[label]["errors"][f"round {round_}"] = again["errors"]
    for row in rows.values():
        row["throughput_rps"] = statistics.median(row["rounds_rps"])
    return list(rows.values())


# The memory run's variants: the stage service's defaults, then onnxruntime's prepacking forced on (a private,
# repacked copy of every weight matrix, made one at a time while loading: the load-time spike).
MEMORY_VARIANTS = {"defaults": {}, "prepacking on": {"STAGE_PREPACK": "true"}}


def memory_section(large: Path, large_whole: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baseline = imports_rss_mb()
    for variant, env in MEMORY_VARIANTS.items():
        first = len(rows)
        for pipeline in (large_whole, large):
            manifest = load_manifest(pipeline)
            _log(f"memory ({variant}): {manifest.name} ({len(manifest.stages)} stage process(es))")
            with direct_chain(pipeline, env=env) as stages:
                import httpx

                from stage_service.protocol import request_body

                body, headers = request_body(pipeline_inputs(manifest, 1, 0))
                for _ in range(5):
                    r = httpx.post(f"{stages[0].url}/v2/models/{manifest.name}/infer", content=body,
                                   headers=headers, timeout=120)
                    r.raise_for_status()
                for stage, proc in zip(manifest.stages, stages, strict=True):
                    rss = rss_mb(proc.proc.pid)
                    rows.append({"variant": variant, "setup": manifest.name, "stage": stage.name,
                                 "param_mb": stage.cost.param_bytes / 1e6, "external_data": stage.data_file is not None,
                                 "peak_rss_mb": rss["peak"], "steady_rss_mb": rss["steady"],
                                 "anon_mb": rss["anon"], "file_mb": rss["file"], "imports_rss_mb": baseline})
        whole_rss = rows[first]["peak_rss_mb"]
        for row in rows[first:]:
            row["ratio_to_whole"] = row["peak_rss_mb"] / whole_rss
    return rows


def batching_section(whole_pipeline: Path, seconds: float, concurrency: int = 16) -> list[dict[str, Any]]:
    manifest = load_manifest(whole_pipeline)
    rows: list[dict[str, Any]] = []
    for label, env in (("off", {}), ("max batch 16, max delay 5 ms",
                                     {"STAGE_MAX_BATCH_SIZE": "16", "STAGE_MAX_QUEUE_DELAY_MS": "5"})):
        _log(f"dynamic batching {label}")
        with direct_chain(whole_pipeline, {"STAGE_MAX_INFLIGHT": "256", **env}) as stages:
            r = over_http(stages[0].url, manifest.name, seconds, sweep=(1, concurrency))
        rows.append({"setup": f"dynamic batching {label}", "throughput_rps": r["sweep"][concurrency]["rps"],
                     "p50_ms_at_concurrency": r["sweep"][concurrency]["p50_ms"], "errors": r["errors"]})
    return rows


# --------------------------------------------------------------------------------------------- output


def _f(x: float) -> str:
    return f"{x:.2f}"


def gap_markdown(latency: list[dict[str, Any]]) -> list[str]:
    """The loopback chain's p50 over the whole model's, step by step through the two reference rows: each step's
    p50 and what it adds to the one before (differences of p50s from the same interleaved turns)."""
    setups = [r for r in latency if not r.get("reference")]
    references = [r for r in latency if r.get("reference")]
    if len(setups) < 3 or len(references) < 2:
        return []
    steps = [(setups[0], "the whole model, one session"),
             (setups[1], "the split itself: one session per stage instead of one"),
             (references[0], "each stage run after the idle a stage process has between its turns"),
             (references[1], "stage processes, sockets and copies, at the least a Python stage does"),
             (setups[2], "the stage service over that floor: HTTP server, checks, limits, metrics")]
    whole = setups[0]["p50_ms"]
    out = ["#### Where the loopback chain's extra time goes", "",
           "From the whole model to the stage processes in steps, all measured in the same turns as the table above "
           "(p50s; each step's difference to the one before is what it adds). The two reference rows: the stages "
           "in-process, each run after sleeping as long as a stage process idles between its turns (the sleep not "
           "counted), and the same chain of processes made of floor stages (`benchmarks/floor_stage.py`: raw "
           "asyncio HTTP/1.1, tensors as views of the body, inline inference, the stage service's own client to "
           "the next; no framework, checks, limits, metrics or tracing).", "",
           "| step | p50 ms | vs whole model | adds ms | what the step adds |", "|---|---|---|---|---|"]
    before = None
    for row, adds in steps:
        added = "" if before is None else f"{row['p50_ms'] - before:+.2f}"
        out.append(f"| {row['setup']} | {_f(row['p50_ms'])} | {row['p50_ms'] / whole:.2f}x | {added} | {adds} |")
        before = row["p50_ms"]
    return out + [""]


def markdown(result: dict[str, Any]) -> str:
    out = ["## make bench", "", f"Measured by `make bench` on {result['machine']}, {result['date']}.",
           "All traffic on loopback; batch 1 unless stated; JSON in `build/bench/bench.json`.", ""]
    lat = [r for r in result.get("latency", []) if not r.get("reference")]
    if lat:
        out += ["### Latency and throughput: in-process, chained processes, Envoy mesh", "",
                "p50 and p99: concurrency 1, the four setups up at once and measured in turns (windows of about a "
                "second, each setup first in turn), so a machine whose speed moves slows them alike; throughput: "
                "each setup after the other.", "",
                "| setup | p50 ms | p99 ms | throughput /s (best of concurrency 1, 2, 4, 8) |", "|---|---|---|---|"]
        out += [f"| {r['setup']} | {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {_f(r['throughput_rps'])} |" for r in lat]
        mesh, whole = lat[-1], lat[0]["p50_ms"]
        out += ["", f"Against the whole model in-process (p50): stages chained in-process "
                f"{lat[1]['p50_ms'] / whole:.2f}x, stage processes chained on loopback {lat[2]['p50_ms'] / whole:.2f}x "
                f"(target at most 1.10x), through the Envoy mesh {mesh['p50_ms'] / whole:.2f}x (target at most 1.15x). "
                f"Envoy mesh overhead over direct chaining: {_f(mesh['per_hop_overhead_ms'])} ms p50 per hop "
                f"(target at most 1 ms; five runs below).", ""]
        out += gap_markdown(result["latency"])
    env = result.get("envoy_overhead")
    if env:
        overheads = sorted(r["per_hop_overhead_ms"] for r in env)
        out += ["### Envoy mesh overhead per hop, five runs", "",
                "Direct chain and mesh both up; in each run the direct chain, then the mesh, at concurrency 1 "
                "(p50). Per hop: (mesh - direct) / stages: the gateway hop and each stage-to-stage hop gain Envoy.",
                "", "| run | direct p50 ms | mesh p50 ms | overhead per hop ms |", "|---|---|---|---|"]
        out += [f"| {r['run']} | {_f(r['direct_p50_ms'])} | {_f(r['mesh_p50_ms'])} | {_f(r['per_hop_overhead_ms'])} |"
                for r in env]
        out += ["", f"Median of the {len(env)} runs: {_f(overheads[len(overheads) // 2])} ms per hop "
                "(target at most 1 ms).", ""]
    prof = result.get("profile")
    if prof:
        client = prof[0]["direct"]["client_ms"], prof[0]["mesh"]["client_ms"]
        out += ["### Where one request's time goes (4 stages, batch 1, mean of 100 sequential requests, ms)", "",
                f"End to end: {client[0]:.2f} ms directly chained, {client[1]:.2f} ms through the mesh. Hop into a "
                "stage: its caller's time for the call less the stage's own request time (sockets, the HTTP "
                "client's and server's I/O up to the request's headers; through the mesh also Envoy, TLS at the "
                "gateway and mTLS between sidecars). Own work: the stage's request time (from its headers to its "
                "answer) less inference and its call to the next stage: receiving the body, decode, encode, HTTP "
                "parsing and framing, handing the run to the inference thread. Decode and "
                "encode: the same functions timed in-process on the same tensors. Method: "
                "`benchmarks/request_profile.py`.", ""]
        out += request_profile.markdown([r["stage"] for r in prof], prof, [r["direct"] for r in prof],
                                        [r["mesh"] for r in prof])
        out.append("")
    eq = result.get("equal_cores")
    if eq:
        whole = eq[0]["throughput_rps"]
        rounds = len(eq[0].get("rounds_rps", [0]))
        out += ["### Equal cores (2): split pipeline against the whole model", "",
                f"The three setups take turns, {rounds} rounds; throughput: the median of the rounds, at the "
                "concurrency the first round's sweep (1, 2, 4, 8) found best; p50: concurrency 1, first round.", "",
                "| setup | p50 ms | throughput /s (median) | each round /s | vs whole model |", "|---|---|---|---|---|"]
        out += [f"| {r['setup']} | {_f(r['p50_ms'])} | {_f(r['throughput_rps'])} | "
                f"{', '.join(_f(x) for x in r.get('rounds_rps', []))} | {r['throughput_rps'] / whole:.2f}x |"
                for r in eq]
        out += ["", "Target: 2-stage pipeline throughput at least 0.9x the whole model's.", ""]
    mem = result.get("memory")
    if mem:
        out += ["### Memory: steady and peak RSS per stage process, large variant (4 stages)", "",
                f"Imports alone (what a stage process has imported before loading anything): "
                f"{_f(mem[0].get('imports_rss_mb', float('nan')))} MB. Steady: after 5 requests; "
                "anonymous / file-backed: its two parts then (file-backed: mapped libraries and weights).", "",
                "| variant | pipeline | stage | params MB | weights | steady RSS MB | anonymous / file-backed MB "
                "| peak RSS MB | peak vs whole |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r.get('variant', 'defaults')} | {r['setup']} | {r['stage']} | {_f(r['param_mb'])} | "
                f"{'external data' if r.get('external_data') else 'in the model'} | "
                f"{_f(r.get('steady_rss_mb', float('nan')))} | "
                f"{_f(r.get('anon_mb', float('nan')))} / {_f(r.get('file_mb', float('nan')))} | "
                f"{_f(r['peak_rss_mb'])} | {r['ratio_to_whole']:.2f}x |" for r in mem]
        split = [r for r in mem if r.get("variant", "defaults") == "defaults" and r["ratio_to_whole"] < 1.0]
        largest = max(split, key=lambda r: r["peak_rss_mb"]) if split else None
        verdict = (f": **{largest['ratio_to_whole']:.2f}x** ({largest['stage']}, {largest['peak_rss_mb']:.0f} MB)"
                   if largest else "")
        out += ["", f"Target: largest stage at most 0.4x the whole model's peak RSS (defaults){verdict}. The large "
                "variant is `benchmarks/large_model.py`'s (the layers of `reference --hidden-layers 8`, 492 MB of "
                "weights, written directly as ONNX: tf2onnx cannot convert it in 24 GB); both pipelines split with "
                "`--external-data`.", ""]
    bat = result.get("batching")
    if bat:
        out += ["### Dynamic batching (whole reference model as one stage, concurrency 16)", "",
                "| setup | throughput /s | p50 ms |", "|---|---|---|"]
        out += [f"| {r['setup']} | {_f(r['throughput_rps'])} | {_f(r['p50_ms_at_concurrency'])} |" for r in bat]
        out.append("")
    for name, error in result.get("failed", {}).items():
        out += [f"### {name}: failed", "", f"```\n{error}\n```", ""]
    return "\n".join(out)


def plot(result: dict[str, Any], out: Path) -> None:
    """Bars: p50 and throughput per latency setup; peak RSS per process of the memory run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [r for r in result.get("latency", []) if not r.get("reference")]
    if lat:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [r["setup"].split(" (")[0] for r in lat]
        left.barh(labels, [r["p50_ms"] for r in lat])
        left.set_xlabel("p50 latency, ms (batch 1)")
        right.barh(labels, [r["throughput_rps"] for r in lat], color="tab:green")
        right.set_xlabel("throughput at saturation, requests/s")
        right.set_yticks([])
        fig.suptitle("reference pipeline: in-process, chained processes, Envoy mesh")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
    mem = result.get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(8, 4))
        shown = [r for r in mem if r.get("variant", "defaults") == "defaults"]
        ax.bar([r["stage"] for r in shown], [r["peak_rss_mb"] for r in shown])
        ax.set_ylabel("peak RSS, MB")
        ax.set_title("peak RSS per process: whole model vs each of 4 stages")
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=100)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("build/reference"))
    parser.add_argument("--model", type=Path, default=Path("build/reference.onnx"))
    parser.add_argument("--large", type=Path, default=Path("build/large"))
    parser.add_argument("--large-whole", type=Path, default=Path("build/large-whole"))
    parser.add_argument("--out", type=Path, default=Path("build/bench"))
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--only", nargs="*", choices=["latency", "profile", "envoy_overhead", "equal_cores",
                                                            "memory", "batching"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "bench.json"
    # with --only, the other sections keep their last results, so BENCHMARKS.md stays whole
    result: dict[str, Any] = json.loads(previous.read_text()) if args.only and previous.exists() else {}
    result.update({"machine": describe(), "date": time.strftime("%Y-%m-%d"), "failed": {}})
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "latency": lambda: latency_section(args.pipeline, args.seconds),
        "profile": lambda: profile_section(args.pipeline),
        "envoy_overhead": lambda: envoy_overhead_section(args.pipeline, args.seconds),
        "equal_cores": lambda: equal_cores_section(args.model, args.out / "equal-cores", args.seconds),
        "memory": lambda: memory_section(args.large, args.large_whole),
        "batching": lambda: batching_section(ensure_split(args.model, args.out / "equal-cores" / "whole", 1),
                                             args.seconds),
    }
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        try:
            result[name] = fn()
        except Exception as exc:  # report and go on: one broken section must not hide the others
            result["failed"][name] = f"{type(exc).__name__}: {exc}"
            _log(f"{name} failed: {exc}")
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)
    update_section(args.benchmarks, "bench", markdown(result))
    print(markdown(result))
    _log(f"wrote {args.out}/bench.json, PNG plots there, and the 'bench' section of {args.benchmarks}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
