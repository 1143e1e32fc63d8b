"""Faults under load through the real local mesh: replicas frozen (SIGSTOP, not killed) under a steady rate.

`freeze_under_load` is the scenario. The fault test (`tests/mesh/test_local_faults.py`) runs it short and
asserts that no request fails; `python -m benchmarks.faults --pipeline DIR` runs it longer on a mesh of its
own and writes the latency percentiles before, during and after the freeze into RELIABILITY.md: figures,
never a pass/fail.

    python -m benchmarks.faults --pipeline build/reference --stage reference-stage-1 --rate 20 --freeze 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml

from benchmarks.sections import update_section
from loadtest.machine import describe
from mesh import local
from mesh.v2client import infer
from model_export.manifest import DATATYPE_TO_NUMPY, load_manifest

PHASES = ("before", "during", "after")
RELIABILITY_HEADER = ("# Reliability\n\nEvery figure here was measured by the command named in its section, on "
                      "the machine it names.\n")


@dataclass(frozen=True)
class Outcome:
    phase: str
    seconds: float
    error: str | None


@dataclass(frozen=True)
class PhaseSummary:
    phase: str
    sent: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None


@contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP every pid; SIGCONT them whatever happens (a stopped process would not even die by SIGTERM)."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _plain_client() -> httpx.Client:
    return httpx.Client(timeout=60.0)


def freeze_under_load(send: Callable[[httpx.Client, int], str | None], victims: list[int], *, rate: float,
                      before_s: float, freeze_s: float, after_s: float, workers: int = 32,
                      new_client: Callable[[], httpx.Client] = _plain_client) -> list[Outcome]:
    """`fault_under_load` with `victims` frozen (SIGSTOP) during the fault window, thawed after it."""
    return fault_under_load(send, lambda: frozen(victims), rate=rate, before_s=before_s, fault_s=freeze_s,
                            after_s=after_s, workers=workers, new_client=new_client)


def fault_under_load(send: Callable[[httpx.Client, int], str | None],
                     fault: Callable[[], AbstractContextManager[object]], *, rate: float, before_s: float,
                     fault_s: float, after_s: float, workers: int = 32,
                     new_client: Callable[[], httpx.Client] = _plain_client) -> list[Outcome]:
    """Send at `rate` per second (open loop: a slow answer does not slow the sending) for
    before_s + fault_s + after_s seconds; `fault()` is entered when the middle window starts and left when it
    ends. `send(client, i)` makes the i-th request, on a client `new_client()` made for its thread (one of the
    gateway's: `gateway_client`), and returns None or what went wrong. Each outcome is filed under the phase it
    was sent in."""
    local_client = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def one(i: int, phase: str) -> Outcome:
        client = getattr(local_client, "client", None)
        if client is None:
            client = local_client.client = new_client()
            with lock:
                clients.append(client)
        start = time.perf_counter()
        try:
            error = send(client, i)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Outcome(phase, time.perf_counter() - start, error)

    def phase_of(at: float) -> str:
        return "before" if at < before_s else "during" if at < before_s + fault_s else "after"

    futures = []
    with ThreadPoolExecutor(workers) as pool, ExitStack() as stack:
        t0 = time.monotonic()
        active: ExitStack | None = None
        for i in range(int((before_s + fault_s + after_s) * rate)):
            at = i / rate
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            phase = phase_of(at)
            if phase == "during" and active is None:
                active = stack.enter_context(ExitStack())
                active.enter_context(fault())
            if phase == "after" and active is not None:
                active.close()
            futures.append(pool.submit(one, i, phase))
    outcomes = [f.result() for f in futures]
    for client in clients:
        client.close()
    return outcomes


def summarize(outcomes: list[Outcome]) -> list[PhaseSummary]:
    out = []
    for phase in PHASES:
        mine = [o for o in outcomes if o.phase == phase]
        ok_ms = np.array([o.seconds * 1000 for o in mine if o.error is None])
        out.append(PhaseSummary(phase, len(mine), sum(o.error is not None for o in mine),
                                float(np.percentile(ok_ms, 50)) if ok_ms.size else None,
                                float(np.percentile(ok_ms, 99)) if ok_ms.size else None))
    return out


def _inputs(pipeline: Path, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    specs = load_manifest(pipeline).inputs
    return [{t.name: rng.random([1] + [max(d, 1) for d in t.shape[1:]]).astype(DATATYPE_TO_NUMPY[t.datatype])
             for t in specs} for _ in range(count)]


def mesh_sender(state: local.State, inputs: list[dict[str, np.ndarray]],
                expected: list[dict[str, np.ndarray]]) -> Callable[[httpx.Client, int], str | None]:
    """`send` for `freeze_under_load`: the i-th request through the gateway, checked against `expected`."""
    def send(client: httpx.Client, i: int) -> str | None:
        out, _ = infer(client, state.layout.gateway_url, state.layout.pipeline, inputs[i % len(inputs)])
        want = expected[i % len(inputs)]
        same = all(np.allclose(out[k], want[k], atol=1e-5, rtol=0) for k in want)
        return None if same else "wrong output"
    return send


def gateway_client(gateway: local.GatewayCredentials) -> Callable[[], httpx.Client]:
    """`new_client` for `fault_under_load` through the mesh's gateway: its CA, a token."""
    return lambda: gateway.client(timeout=60.0)


def replica_pids(state: local.State, replica: str) -> list[int]:
    """The app and the sidecar of one replica: the pod that freezes."""
    return [p.pid for p in state.procs if p.name in (replica, f"{replica}-sidecar")]


def phase_table(summary: list[PhaseSummary]) -> str:
    """The Markdown table of a fault run's phases: sent, failed, p50 and p99."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = "\n".join(f"| {s.phase} | {s.sent} | {s.failed} | {ms(s.p50_ms)} | {ms(s.p99_ms)} |" for s in summary)
    return "| phase | sent | failed | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- |\n" + rows + "\n"


def _markdown(args: argparse.Namespace, summary: list[PhaseSummary]) -> str:
    return (f"## A frozen replica (SIGSTOP) under load\n\n`python -m benchmarks.faults --pipeline {args.pipeline} "
            f"--stage {args.stage} --rate {args.rate:g} --freeze {args.freeze:g}`: one of two replicas of "
            f"{args.stage} (app and sidecar) frozen for {args.freeze:g} s under {args.rate:g} requests/s through "
            f"the local mesh; phases by the time a request was sent. Machine: {describe()}.\n\n" + phase_table(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="a split pipeline directory")
    parser.add_argument("--stage", required=True, help="the stage given two replicas, one of which freezes")
    parser.add_argument("--policy", type=Path, default=None, help="mesh.yaml (the stage gets 2 replicas)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before the freeze")
    parser.add_argument("--freeze", type=float, default=10.0, help="seconds frozen (default 10)")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after it")
    parser.add_argument("--out", type=Path, default=Path("build/reliability"), help="JSON results go here")
    parser.add_argument("--markdown", type=Path, default=Path("RELIABILITY.md"), help="section written here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    policy = work / "mesh.yaml"
    base = yaml.safe_load(args.policy.read_text()) if args.policy else {}
    base.setdefault("stages", {}).setdefault(args.stage, {})["replicas"] = 2
    policy.write_text(yaml.safe_dump(base))
    try:
        state = local.up(args.pipeline, policy, work / ".mesh", gateway_port=0)
    except local.MeshError as exc:
        print(f"faults: {exc}", file=sys.stderr)
        return 2
    try:
        inputs = _inputs(args.pipeline, 4)
        gateway = local.gateway_credentials(work / ".mesh", state, "benchmarks-faults")
        with gateway.client(timeout=60.0) as client:
            expected = [infer(client, state.layout.gateway_url, state.layout.pipeline, x)[0] for x in inputs]
        victim = state.layout.of_stage(args.stage)[1].name
        outcomes = freeze_under_load(mesh_sender(state, inputs, expected), replica_pids(state, victim),
                                     rate=args.rate, before_s=args.before, freeze_s=args.freeze, after_s=args.after,
                                     new_client=gateway_client(gateway))
    finally:
        local.down(work / ".mesh")
    summary = summarize(outcomes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "freeze.json").write_text(json.dumps(
        {"machine": describe(), "args": {k: str(v) for k, v in vars(args).items()},
         "phases": [asdict(s) for s in summary],
         "errors": sorted({o.error for o in outcomes if o.error})[:20]}, indent=1))
    update_section(args.markdown, "freeze", _markdown(args, summary), header=RELIABILITY_HEADER)
    for s in summary:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
