"""`make reliability`: the longer fuzz and fault runs of issue 14, written into RELIABILITY.md as figures.

On the 3-stage tiny pipeline (`model_export.tiny`, written under --out), on a local mesh of its own:
hypothesis draws bad input of four classes (`benchmarks.fuzz_inputs`: JSON bodies, binary framings,
headers/paths/methods, raw bytes on the socket) and sends each both to the first stage's app directly and
through the gateway; the answers are counted by class and status, the processes checked alive, their peak
RSS read. Then, each on a fresh mesh with two replicas of the middle stage under a steady open-loop rate,
one replica is SIGKILLed (app and sidecar), SIGTERMed (the app, which drains) and frozen (SIGSTOP of app
and sidecar) for the fault window, and frozen once more for `--target-freeze` seconds: issue 14's freeze
target (no failure, p99 during the freeze within 2x the steady p99), a figure here, never a pass/fail.

    python -m benchmarks.reliability --examples 600 --rate 20 --steady 20 --fault 60 --target-freeze 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import faults
from benchmarks.fuzz_inputs import header_names, header_values, json_values, raw_exchange, raw_requests, requests
from loadtest.machine import describe
from mesh import local, procs, sockets
from mesh.v2client import infer
from model_export.tiny import write_tiny_pipeline
from stage_service.protocol import HEADER_LENGTH, encode_request

PIPELINE = "tiny"
MIDDLE = f"{PIPELINE}-stage-1"
INFER = f"/v2/models/{PIPELINE}/infer"
PATHS = [INFER, "/v2/models/tiny-stage-0/infer", "/v2/models/tiny", "/v2/health/ready", "/v2", "/metrics",
         "/v2/models/%00/infer", "/v2/models/tiny/versions/v1/infer"]
RAW_SENDERS = 16  # raw exchanges at once: one that the server keeps waiting costs RAW_WAIT_S
RAW_WAIT_S = 2.0
MIB = 1 << 20


@dataclass(frozen=True)
class Target:
    """Where fuzzed input goes: a base URL, and a Unix socket when it listens on one (a local mesh's app
    listens on nothing else), else the URL's host and port; for the gateway, its CA and a token (`gateway`), so
    the fuzzed requests pass its TLS and token check and reach the first stage."""

    name: str
    url: str
    uds: str | None = None
    gateway: local.GatewayCredentials | None = None

    def connect(self, timeout: float) -> socket.socket:
        if self.uds is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.uds)
            return sock
        parts = urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        sock = socket.create_connection((host, parts.port or 80), timeout=timeout)
        context = self.gateway.ssl_context() if self.gateway else None
        return context.wrap_socket(sock, server_hostname=host) if context else sock

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        if self.gateway is not None:
            return self.gateway.client(base_url=self.url, timeout=30.0, transport=transport)
        return httpx.Client(base_url=self.url, timeout=30.0, transport=transport)


def _json(client: httpx.Client, body: Any) -> str:
    return str(client.post(INFER, content=json.dumps(body), headers={"content-type": "application/json"})
               .status_code)


Binary = tuple[tuple[dict[str, Any], bytes], bytes, int | str | None]


def _binary(client: httpx.Client, drawn: Binary) -> str:
    (header, payload), junk, declared = drawn
    head = json.dumps(header).encode()
    length = str(len(head)) if declared is None else str(declared)
    return str(client.post(INFER, content=head + payload + junk,
                           headers={HEADER_LENGTH: length, "content-type": "application/octet-stream"}).status_code)


def _headers(client: httpx.Client, drawn: tuple[dict[str, str], str, str]) -> str:
    extra, path, method = drawn
    body, length = encode_request({"x": np.ones((1, 16), np.float32)})
    return str(client.request(method, path, content=body if method in ("POST", "PUT") else None,
                              headers={HEADER_LENGTH: str(length), **extra}).status_code)


HTTP_CLASSES: dict[str, tuple[st.SearchStrategy[Any], Callable[[httpx.Client, Any], str]]] = {
    "JSON bodies": (st.one_of(requests(binary=False).map(lambda r: r[0]), json_values), _json),
    "binary framing": (st.tuples(requests(binary=True), st.binary(max_size=64),
                                 st.one_of(st.none(), st.integers(-10, 10**7), header_values)), _binary),
    "headers, paths, methods": (st.tuples(st.dictionaries(header_names, header_values, max_size=30),
                                          st.sampled_from(PATHS),
                                          st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])),
                                _headers),
}
RAW_CLASS = "raw bytes (request line, headers, body)"
CLASSES = [*HTTP_CLASSES, RAW_CLASS]


def _drawn(strategy: st.SearchStrategy[Any], examples: int) -> list[Any]:
    """`examples` values of `strategy`, the same ones every run (derandomized)."""
    values: list[Any] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def collect(drawn: Any) -> None:
        values.append(drawn)

    collect()
    return values


def _send_http(client: httpx.Client, send: Callable[[httpx.Client, Any], str], drawn: Any) -> str:
    try:
        return send(client, drawn)
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"


def fuzz(target: Target, examples: int) -> dict[str, Counter[str]]:
    """Per input class, the answers' statuses (or what happened instead) for `examples` drawn inputs."""
    counts: dict[str, Counter[str]] = {}
    with target.client() as client:
        for name, (strategy, send) in HTTP_CLASSES.items():
            counts[name] = Counter(_send_http(client, send, d) for d in _drawn(strategy, examples))
    raw = _drawn(raw_requests(INFER), examples)
    with ThreadPoolExecutor(RAW_SENDERS) as pool:
        counts[RAW_CLASS] = Counter(pool.map(lambda data: raw_exchange(target.connect(RAW_WAIT_S), data),
                                                    raw))
    return counts


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def _is_server_error(status: str) -> bool:
    return len(status) == 3 and status.startswith("5") and status != "503"


def _fuzz_markdown(examples: int, results: dict[str, dict[str, Counter[str]]], crashed: list[str],
                   peak: dict[str, int]) -> str:
    rows = []
    for target, by_class in results.items():
        for name, counts in by_class.items():
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            fives = sum(v for k, v in counts.items() if _is_server_error(k))
            rows.append(f"| {target} | {name} | {sum(counts.values())} | {statuses} | {fives} |")
    total = sum(sum(c.values()) for by_class in results.values() for c in by_class.values())
    return (f"## Fuzzed bad input\n\n{examples} inputs per class and target drawn by hypothesis from "
            "`benchmarks.fuzz_inputs` (derandomized; the fuzz test draws from the same strategies), sent to the "
            "first stage's app directly and through the local mesh's gateway (3-stage tiny pipeline), "
            f"{total} in all. Raw bytes go on a fresh connection each: `closed` is the server closing it without "
            "an answer (its right for a malformed request), `kept waiting` a server still reading after "
            f"{RAW_WAIT_S:g} s what the framing promised (until its own header or body timeout).\n\n"
            "| target | class | sent | responses by status | 5xx other than 503 |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) +
            f"\n\nProcesses that died during the fuzz: {', '.join(crashed) or 'none'}. Peak RSS (VmHWM) after "
            "it: " + ", ".join(f"{k} {v} MB" for k, v in sorted(peak.items())) + ".\n")


@dataclass(frozen=True)
class FaultSpec:
    title: str
    who: str  # "pod": the replica's app and sidecar; "app": the app alone
    action: str  # "kill", "term" or "freeze"
    done: str  # what happened to it, for the text


FAULTS: dict[str, FaultSpec] = {
    "sigkill": FaultSpec("A replica killed (SIGKILL of app and sidecar)", "pod", "kill", "SIGKILLed"),
    "sigterm": FaultSpec("A replica stopped (SIGTERM of the app: it drains)", "app", "term", "SIGTERMed"),
    "freeze": FaultSpec("A replica frozen (SIGSTOP of app and sidecar) for the whole window", "pod", "freeze",
                        "frozen"),
    "freeze-target": FaultSpec("The freeze target: a replica frozen for a short window", "pod", "freeze", "frozen"),
}


@contextmanager
def _signalled(pids: list[int], signum: int) -> Iterator[None]:
    for pid in pids:
        os.kill(pid, signum)
    yield


def _fault(spec: FaultSpec, pids: list[int]) -> Callable[[], AbstractContextManager[object]]:
    if spec.action == "freeze":
        return lambda: faults.frozen(pids)
    signum = signal.SIGKILL if spec.action == "kill" else signal.SIGTERM
    return lambda: _signalled(pids, signum)


@dataclass(frozen=True)
class FaultRun:
    name: str
    rate: float
    steady_s: float
    fault_s: float
    load: tuple[float, float]  # 1-minute load average at the start and at the end
    phases: list[faults.PhaseSummary]
    errors: list[str]


def _policy(base: Path | None, out: Path) -> Path:
    """The policy under test (mesh.yaml or the defaults) with two replicas of the middle stage."""
    data = (yaml.safe_load(base.read_text()) or {}) if base else {}
    data.setdefault("stages", {}).setdefault(MIDDLE, {})["replicas"] = 2
    path = out / "mesh-2x.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_fault(name: str, pipeline: Path, policy: Path, *, rate: float, steady_s: float, fault_s: float) -> FaultRun:
    """One of two replicas of the middle stage of a fresh mesh hit by `name` when the fault window opens."""
    spec = FAULTS[name]
    state_dir = Path(tempfile.mkdtemp(prefix=f"reliability-{name}-")) / ".mesh"
    state = local.up(pipeline, policy, state_dir, gateway_port=0)
    load_start = os.getloadavg()[0]
    try:
        victim = state.layout.of_stage(MIDDLE)[1].name
        pids = faults.replica_pids(state, victim) if spec.who == "pod" else [
            p.pid for p in state.procs if p.name == victim]
        inputs = faults._inputs(pipeline, 4)
        gateway = local.gateway_credentials(state_dir, state, "benchmarks-reliability")
        with gateway.client(timeout=60.0) as client:
            expected = [infer(client, state.layout.gateway_url, PIPELINE, x)[0] for x in inputs]
        outcomes = faults.fault_under_load(faults.mesh_sender(state, inputs, expected), _fault(spec, pids),
                                           rate=rate, before_s=steady_s, fault_s=fault_s, after_s=steady_s,
                                           new_client=faults.gateway_client(gateway))
    finally:
        local.down(state_dir)
    return FaultRun(name, rate, steady_s, fault_s, (load_start, os.getloadavg()[0]), faults.summarize(outcomes),
                    sorted({o.error for o in outcomes if o.error})[:10])


def _ratio(run: FaultRun) -> str:
    before, during = run.phases[0].p99_ms, run.phases[1].p99_ms
    if not before or during is None:
        return "-"
    return f"{during / before:.2f}"


def _fault_markdown(run: FaultRun) -> str:
    spec = FAULTS[run.name]
    errors = "; ".join(run.errors) or "none"
    return (f"## {spec.title}, {run.fault_s:g} s\n\nOne of two replicas of {MIDDLE} "
            f"({'app and sidecar' if spec.who == 'pod' else 'the app'}) {spec.done} at the start of a "
            f"{run.fault_s:g} s window, with {run.steady_s:g} s of steady load before and after it, "
            f"{run.rate:g} requests/s (open loop) through the local mesh's gateway; phases by the time a "
            f"request was sent, latency of the answered ones. Load average {run.load[0]:.1f} at the start, "
            f"{run.load[1]:.1f} at the end. p99 during / p99 before: {_ratio(run)}. Errors: {errors}.\n\n"
            + faults.phase_table(run.phases))


def _header(started: float, load: tuple[float, float], policy: Path | None, argv: str) -> str:
    return (f"{faults.RELIABILITY_HEADER}\n`python -m benchmarks.reliability {argv}` (`make reliability`), "
            f"policy {policy or 'the defaults'}, took {(time.monotonic() - started) / 60:.1f} min. Machine: "
            f"{describe()}; shared with other work, load average (1 min) {load[0]:.1f} at the start and "
            f"{load[1]:.1f} at the end.\n")


def _fuzz_run(pipeline: Path, examples: int) -> tuple[dict[str, dict[str, Counter[str]]], list[str], dict[str, int]]:
    work = Path(tempfile.mkdtemp(prefix="reliability-fuzz-"))
    state = local.up(pipeline, None, work / ".mesh", gateway_port=0)
    try:
        first = state.layout.of_stage(f"{PIPELINE}-stage-0")[0]
        gateway = local.gateway_credentials(work / ".mesh", state, "benchmarks-reliability")
        targets = [Target("stage app", sockets.LOCAL_BASE, first.app_socket),
                   Target("gateway", gateway.url, gateway=gateway)]
        results = {t.name: fuzz(t, examples) for t in targets}
        crashed = [p.name for p in state.procs if not procs.alive(p)]
        peak = {p.name: peak_rss_mb(p.pid) for p in state.procs if procs.alive(p)}
    finally:
        local.down(work / ".mesh")
    return results, crashed, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=600, help="fuzzed inputs per class and target")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second in the fault runs")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of load before and after a fault")
    parser.add_argument("--fault", type=float, default=60.0, help="seconds of each fault's window")
    parser.add_argument("--target-freeze", type=float, default=10.0, help="seconds of the freeze target's run")
    parser.add_argument("--faults", default=",".join(FAULTS), help="which, comma-separated (default: all)")
    parser.add_argument("--policy", type=Path, default=None, help="mesh.yaml (default: the policy defaults)")
    parser.add_argument("--markdown", type=Path, default=Path("RELIABILITY.md"), help="written here")
    parser.add_argument("--out", type=Path, default=Path("build/reliability"),
                        help="the tiny pipeline and reliability.json go here")
    args = parser.parse_args(argv)
    chosen = [f for f in args.faults.split(",") if f]
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault {', '.join(unknown)}; expected some of {', '.join(FAULTS)}")
    started, load_start = time.monotonic(), os.getloadavg()[0]
    pipeline = args.out / PIPELINE
    shutil.rmtree(pipeline, ignore_errors=True)
    write_tiny_pipeline(pipeline)
    try:
        results, crashed, peak = _fuzz_run(pipeline, args.examples)
        policy = _policy(args.policy, args.out)
        runs = [run_fault(name, pipeline, policy, rate=args.rate, steady_s=args.steady,
                          fault_s=args.target_freeze if name == "freeze-target" else args.fault) for name in chosen]
    except local.MeshError as exc:
        print(f"reliability: {exc}", file=sys.stderr)
        return 2
    header = _header(started, (load_start, os.getloadavg()[0]), args.policy, " ".join(argv or sys.argv[1:]))
    sections = [_fuzz_markdown(args.examples, results, crashed, peak), *(_fault_markdown(r) for r in runs)]
    args.markdown.write_text(header + "".join(f"\n{s}" for s in sections))
    (args.out / "reliability.json").write_text(json.dumps({
        "machine": describe(), "examples": args.examples, "crashed": crashed, "peak_rss_mb": peak,
        "statuses": {t: {c: dict(v) for c, v in r.items()} for t, r in results.items()},
        "faults": [{**asdict(r), "phases": [asdict(p) for p in r.phases]} for r in runs]}, indent=1))
    print(args.markdown.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
