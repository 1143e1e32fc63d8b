"""`make reliability`: the longer fuzz and fault runs of issue 14, written into RELIABILITY.md as figures.

On the 3-stage tiny pipeline (the one the tests use, written into a temporary directory), on a local mesh of
its own: hypothesis draws the fuzz test's bodies (`tests/stage_service/test_fuzz.py`: JSON bodies, binary
framings, headers/paths/methods) and sends each both to the first stage's app directly and through the
gateway; the answers are counted by class and status, the processes checked alive, the apps' peak RSS read.
Then, each on a fresh mesh with two replicas of the middle stage under load, one replica is SIGKILLed (app
and sidecar), SIGTERMed (the app, which drains), and frozen (`benchmarks.faults`), each run's figures in a
section of its own.

    python -m benchmarks.reliability --examples 600 --rate 20 --phase 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import faults
from benchmarks.sections import update_section
from loadtest.machine import describe
from mesh import local, procs, sockets
from mesh.v2client import infer
from stage_service.protocol import HEADER_LENGTH, encode_request
from tests.stage_service.test_fuzz import header_names, header_values, json_values, requests
from tests.tiny import write_tiny_pipeline

PIPELINE = "tiny"
INFER = f"/v2/models/{PIPELINE}/infer"
PATHS = [INFER, "/v2/models/tiny-stage-0/infer", "/v2/models/tiny", "/v2/health/ready", "/v2", "/metrics",
         "/v2/models/%00/infer", "/v2/models/tiny/versions/v1/infer"]
Send = Callable[[httpx.Client, Any], httpx.Response]


def _json(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post(INFER, content=json.dumps(body), headers={"content-type": "application/json"})


Binary = tuple[tuple[dict[str, Any], bytes], bytes, int | str | None]


def _binary(client: httpx.Client, drawn: Binary) -> httpx.Response:
    (header, payload), junk, declared = drawn
    head = json.dumps(header).encode()
    length = str(len(head)) if declared is None else str(declared)
    return client.post(INFER, content=head + payload + junk,
                       headers={HEADER_LENGTH: length, "content-type": "application/octet-stream"})


def _headers(client: httpx.Client, drawn: tuple[dict[str, str], str, str]) -> httpx.Response:
    extra, path, method = drawn
    body, length = encode_request({"x": np.ones((1, 16), np.float32)})
    return client.request(method, path, content=body if method in ("POST", "PUT") else None,
                          headers={HEADER_LENGTH: str(length), **extra})


CLASSES: dict[str, tuple[st.SearchStrategy[Any], Send]] = {
    "JSON bodies": (st.one_of(requests(binary=False).map(lambda r: r[0]), json_values), _json),
    "binary framing": (st.tuples(requests(binary=True), st.binary(max_size=64),
                                 st.one_of(st.none(), st.integers(-10, 10**7), header_values)), _binary),
    "headers, paths, methods": (st.tuples(st.dictionaries(header_names, header_values, max_size=30),
                                          st.sampled_from(PATHS),
                                          st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])),
                                _headers),
}


def _run_class(client: httpx.Client, strategy: st.SearchStrategy[Any], send: Send, examples: int) -> Counter[str]:
    counts: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def run(drawn: Any) -> None:
        try:
            counts[str(send(client, drawn).status_code)] += 1
        except httpx.HTTPError as exc:
            counts[f"no answer ({type(exc).__name__})"] += 1

    run()
    return counts


def fuzz(url: str, examples: int, uds: str | None = None) -> dict[str, Counter[str]]:
    """Per input class, the answers' statuses (or the exception when none came) for `examples` drawn inputs;
    `uds`: over that Unix socket (a local mesh's app listens on nothing else)."""
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    with httpx.Client(base_url=url, timeout=30.0, transport=transport) as client:
        return {name: _run_class(client, strategy, send, examples) for name, (strategy, send) in CLASSES.items()}


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def _markdown(examples: int, results: dict[str, dict[str, Counter[str]]], crashed: list[str], peak: dict[str, int],
              load: tuple[float, float]) -> str:
    rows = []
    for target, by_class in results.items():
        for name, counts in by_class.items():
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            fives = sum(v for k, v in counts.items() if k.startswith("5") and k != "503")
            rows.append(f"| {target} | {name} | {sum(counts.values())} | {statuses} | {fives} |")
    return (f"## Fuzzed bad input\n\n`python -m benchmarks.reliability` (`make reliability`): {examples} inputs per "
            "class drawn by hypothesis from `tests/stage_service/test_fuzz.py`'s strategies (derandomized), sent to "
            "the first stage's app directly and through the local mesh's gateway (3-stage tiny pipeline). "
            f"Machine: {describe()}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (shared "
            "with other work).\n\n| target | class | sent | responses by status | 5xx other than 503 |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) +
            f"\n\nProcesses that died during the fuzz: {', '.join(crashed) or 'none'}. Peak RSS of the stage apps "
            "(VmHWM): " + ", ".join(f"{k} {v} MB" for k, v in sorted(peak.items())) + ".\n")


def _signal(pids: list[int], signum: int) -> AbstractContextManager[object]:
    for pid in pids:
        os.kill(pid, signum)
    return nullcontext()


# name -> (title, which processes of the second replica of the middle stage get which signal)
SIGNAL_FAULTS: dict[str, tuple[str, str, int]] = {
    "sigkill": ("A replica killed (SIGKILL of app and sidecar) under load", "pod", signal.SIGKILL),
    "sigterm": ("A replica stopped (SIGTERM of the app: it drains) under load", "app", signal.SIGTERM),
}


def signal_fault(out: Path, name: str, rate: float, phase_s: float) -> list[faults.PhaseSummary]:
    """One of two replicas of the middle stage of a fresh tiny mesh signalled when the fault window opens."""
    _, which, signum = SIGNAL_FAULTS[name]
    policy = out / "mesh-2x.yaml"
    policy.write_text(json.dumps({"stages": {f"{PIPELINE}-stage-1": {"replicas": 2}}}))
    state_dir = Path(tempfile.mkdtemp(prefix=f"reliability-{name}-")) / ".mesh"
    state = local.up(out / PIPELINE, policy, state_dir, gateway_port=0)
    try:
        victim = state.layout.of_stage(f"{PIPELINE}-stage-1")[1].name
        pids = faults.replica_pids(state, victim) if which == "pod" else [
            p.pid for p in state.procs if p.name == victim]
        inputs = faults._inputs(out / PIPELINE, 4)
        with httpx.Client(timeout=60.0) as client:
            expected = [infer(client, state.layout.gateway_url, PIPELINE, x)[0] for x in inputs]
        outcomes = faults.fault_under_load(faults.mesh_sender(state, inputs, expected),
                                           lambda: _signal(pids, signum), rate=rate, before_s=phase_s,
                                           fault_s=phase_s, after_s=phase_s)
    finally:
        local.down(state_dir)
    return faults.summarize(outcomes)


def _fault_markdown(name: str, rate: float, phase_s: float, summary: list[faults.PhaseSummary]) -> str:
    return (f"## {SIGNAL_FAULTS[name][0]}\n\n`make reliability`: one of two replicas of {PIPELINE}-stage-1 "
            f"signalled when the middle {phase_s:g} s window opens, under {rate:g} requests/s through the local "
            f"mesh (3-stage tiny pipeline); phases by the time a request was sent. Machine: {describe()}; load "
            f"average {os.getloadavg()[0]:.1f} at the end.\n\n" + faults.phase_table(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=600, help="fuzzed inputs per class and target")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second in the fault run")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds before, during and after the fault")
    parser.add_argument("--markdown", type=Path, default=Path("RELIABILITY.md"), help="written here")
    parser.add_argument("--out", type=Path, default=Path("build/reliability"),
                        help="the tiny pipeline and the JSON results go here")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="reliability-"))
    pipeline = args.out / PIPELINE
    shutil.rmtree(pipeline, ignore_errors=True)
    write_tiny_pipeline(pipeline)
    try:
        state = local.up(pipeline, None, work / ".mesh", gateway_port=0)
    except local.MeshError as exc:
        print(f"reliability: {exc}", file=sys.stderr)
        return 2
    try:
        first = state.layout.of_stage("tiny-stage-0")[0]
        results = {"stage app": fuzz(sockets.LOCAL_BASE, args.examples, uds=first.app_socket),
                   "gateway": fuzz(state.layout.gateway_url, args.examples)}
        crashed = [p.name for p in state.procs if not procs.alive(p)]
        apps = [p for p in state.procs if p.role == "app"]
        peak = {p.name: peak_rss_mb(p.pid) for p in apps if procs.alive(p)}
    finally:
        local.down(work / ".mesh")
    update_section(args.markdown, "fuzz", _markdown(args.examples, results, crashed, peak,
                                                    (load_start, os.getloadavg()[0])),
                   header=faults.RELIABILITY_HEADER)
    counts = {t: {c: dict(v) for c, v in r.items()} for t, r in results.items()}
    (args.out / "fuzz.json").write_text(json.dumps({"machine": describe(), "examples": args.examples,
                                                    "statuses": counts, "crashed": crashed, "peak_rss_mb": peak},
                                                   indent=1))
    print(json.dumps(counts, indent=1))
    for name in SIGNAL_FAULTS:
        summary = signal_fault(args.out, name, args.rate, args.phase)
        update_section(args.markdown, name, _fault_markdown(name, args.rate, args.phase, summary),
                       header=faults.RELIABILITY_HEADER)
        print(name, summary)
    return faults.main(["--pipeline", str(pipeline), "--stage", "tiny-stage-1", "--rate", f"{args.rate:g}",
                        "--before", f"{args.phase:g}", "--freeze", f"{args.phase:g}", "--after", f"{args.phase:g}",
                        "--out", str(args.out), "--markdown", str(args.markdown)])


if __name__ == "__main__":
    sys.exit(main())
