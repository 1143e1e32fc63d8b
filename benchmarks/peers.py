"""`python -m benchmarks.peers`: our stage service against MLServer, KServe and Ray Serve on the same stage.

    python -m benchmarks.peers --pipeline build/peers-block1 --stage peers-block1-stage-1 --out build/bench-peers

Every server serves the same stage ONNX file in an onnxruntime session with the same options (1 intra-op
thread, 1 inter-op, sequential, every graph optimization) over KServe v2 REST, on a free 127.0.0.1 port. The
peers run from their own venvs (`.venv-peers/<peer>`, made by `make peers-venv`); this driver and the load
generator run from the product's venv. Ours and one peer at a time: both started and ready, then per encoding
both speak (binary tensor extension, JSON, gRPC): each warmed up, a closed loop at concurrency 1 (p50/p99
latency) and a short sweep of higher concurrency (throughput at saturation), every level in turns (`--rounds`
windows each, the two servers alternating), all with the same request bodies; then both stopped. Turns make the
machine's phases fall on both alike; one peer at a time keeps the others' idle processes (Ray's 11) off the
pair. The peak RSS of each server's whole process tree, sampled from /proc every 0.5 s, is reported per encoding.

Ours must serve a stage without a next stage to forward to, so it serves a one-stage manifest made from the
pipeline's (`standalone_manifest`): the same stage entry, the same ONNX file (sha256 checked at start).

Writes `peers.json` (machine, versions, settings, every run), `table.md` (the table for BENCHMARKS.md),
`peers.png` (bar chart) and the servers' logs to --out; prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.sections import update_section
from loadtest import grpc_load, report
from loadtest.machine import describe
from loadtest.runner import LoadSettings, Sample, run
from loadtest.workload import WorkloadError, build
from model_export.manifest import ManifestError, load_manifest, write_manifest
from model_export.samples import random_tensors
from stage_service.launch import HOST, free_port, stage_command, stage_env
from stage_service.supervisor import Child, ProcessId, Target, http_ready, process_tree, wait_gone, wait_ready

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / ".venv-peers"
# Each peer by the name of its distribution, which also names its venv, requirements file and module.
PEERS = ("kserve", "mlserver", "ray")
# What each server speaks: MLServer's REST has no binary tensor extension; Ray Serve has no KServe v2 gRPC.
# grpc: the KServe v2 gRPC protocol, tensors as raw_input_contents (`loadtest.grpc_load`).
ENCODINGS = {"ours": ("binary", "json", "grpc"), "kserve": ("binary", "json", "grpc"), "mlserver": ("json", "grpc"),
             "ray": ("binary", "json")}
TARGET_LEAD = 1.5  # issue 15, item 5: ahead of each peer by this much in p50 and in throughput
TITLES = {"ours": "stage service (ours)", "kserve": "KServe ModelServer", "mlserver": "MLServer",
          "ray": "Ray Serve"}

console = Console(width=None if sys.stdout.isatty() else 170)
err = Console(stderr=True)


# ------------------------------------------------------------------------------------------------ pure helpers


def standalone_manifest(pipeline: Path, stage: str, out: Path) -> Path:
    """A one-stage pipeline directory under `out` serving `stage` alone: its inputs and outputs become the
    pipeline's, its ONNX file is copied beside it (same bytes, so the sha256 check still holds)."""
    manifest = load_manifest(pipeline)
    entry = manifest.stage(stage)
    directory = pipeline if pipeline.is_dir() else pipeline.parent
    one = manifest.model_copy(update={"inputs": entry.inputs, "outputs": entry.outputs, "stages": [entry]})
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(directory / entry.file, out / entry.file)
    write_manifest(type(manifest).model_validate(one.model_dump()), out)
    return out


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the highest throughput."""
    return max(runs, key=lambda r: r["throughput_rps"])


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every peer row, ours in the same encoding measured beside it (the same `pair`): p50 at concurrency 1 and
    peak throughput, as ratios, and whether ours is ahead in both (the target)."""
    ours = {(r.get("pair"), r["encoding"]): r for r in results if r["server"] == "ours" and r.get("runs")}
    verdicts = []
    for r in results:
        mine = ours.get((r.get("pair"), r["encoding"]))
        if r["server"] == "ours" or not r.get("runs") or mine is None:
            continue
        p50_ratio = r["latency"]["latency_ms"]["p50"] / mine["latency"]["latency_ms"]["p50"]
        tput_ratio = best(mine["runs"])["throughput_rps"] / max(best(r["runs"])["throughput_rps"], 1e-9)
        verdicts.append({"peer": r["server"], "encoding": r["encoding"],
                         "peer_p50_over_ours": p50_ratio, "ours_throughput_over_peer": tput_ratio,
                         "ours_ahead": p50_ratio > 1.0 and tput_ratio > 1.0,
                         "target_met": min(p50_ratio, tput_ratio) >= TARGET_LEAD})
    return verdicts


def _fmt_mib(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def verdict_markdown(verdicts: list[dict[str, Any]]) -> str:
    """The target as ratios: peer p50 over ours and our peak throughput over the peer's."""
    lines = [f"Target (ours at least {TARGET_LEAD:g}x ahead of each peer in p50 latency and in throughput, on the same "
             "stage, in every encoding both speak), as ratios in this run:", "",
             "| peer, encoding | peer p50 / ours | ours peak throughput / peer's | ahead | "
             f"at least {TARGET_LEAD:g}x |",
             "|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['peer']}, {v['encoding']} | {v['peer_p50_over_ours']:.2f}x | "
                     f"{v['ours_throughput_over_peer']:.2f}x | {'yes' if v['ours_ahead'] else 'no'} | "
                     f"{'yes' if v.get('target_met') else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], levels: list[int]) -> str:
    """The results as a Markdown table: one row per server and encoding."""
    head = ["server", "version", "encoding", "c=1 p50 ms", "c=1 p99 ms", "c=1 n",
            *[f"c={c} req/s" for c in levels], "peak req/s", "peak RSS MiB", "processes", "in turns with"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if not r.get("runs"):
            lines.append("| " + " | ".join([r["title"], r.get("version", "-"), r["encoding"],
                                            f"failed: {r.get('error', '?')}", *["-"] * (len(head) - 4)]) + " |")
            continue
        lat = r["latency"]["latency_ms"]
        by_level = {run["concurrency"]: run for run in r["runs"]}
        tputs = [f"{by_level[c]['throughput_rps']:.1f}" if c in by_level else "-" for c in levels]
        peak = best(r["runs"])
        lines.append("| " + " | ".join([
            r["title"], r["version"], r["encoding"], f"{lat['p50']:.1f}", f"{lat['p99']:.1f}",
            str(r["latency"]["ok"]), *tputs, f"{peak['throughput_rps']:.1f} (c={peak['concurrency']})",
            _fmt_mib(r.get("peak_rss_bytes")), str(r.get("processes", "-")), _turns_with(r),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _turns_with(row: dict[str, Any]) -> str:
    """The server a row was measured in turns with: ours beside its peer, the peer beside ours."""
    if row.get("pair") is None:
        return "-"
    return TITLES["ours"] if row["server"] != "ours" else TITLES[row["pair"]]


# -------------------------------------------------------------------------------------------- server processes


@dataclass
class Server:
    key: str
    command: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    grpc_port: int
    stop_signal: int = signal.SIGTERM
    child: Child | None = None
    peak_rss: int = 0
    processes: int = 0
    _stop_sampling: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def start(self) -> None:
        self.child = Child.start(self.key, self.command, self.log_path, env=self.env, cwd=REPO, new_session=True)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        assert self.child is not None
        while not self._stop_sampling.wait(0.5):
            tree = process_tree(self.child.pid)
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in tree))
            self.processes = max(self.processes, len(tree))

    def wait_ready(self, model: str, timeout: float) -> float:
        """Seconds until both server and model answer ready; raises with the log if it dies or times out."""
        assert self.child is not None
        probe = http_ready(f"{self.url}/v2/health/ready", f"{self.url}/v2/models/{model}/ready", timeout=2)
        target = Target(name=self.key, ready=probe, alive=self.child.alive, log=self.log,
                        returncode=self.child.proc.poll)
        return wait_ready([target], timeout, interval=0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Signal the server, wait; then SIGKILL whatever of its process tree is left."""
        self._stop_sampling.set()
        if self.child is None:
            return
        tree = [i for i in map(ProcessId.of, process_tree(self.child.pid)) if i is not None]
        if self.child.alive():
            self.child.send(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.proc.wait(timeout)
        for left in wait_gone(tree, 10, interval=0.2):
            left.signal(signal.SIGKILL)
        if self.child.alive():
            self.child.proc.wait(10)


def peer_python(peer: str) -> Path:
    return PEERS_VENV / peer / "bin" / "python"


def peer_version(peer: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({peer!r}))"
    try:
        out = subprocess.run([str(peer_python(peer)), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def git_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def make_server(key: str, pipeline: Path, stage: str, out: Path, mlserver_workers: int) -> Server:
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    log = out / "logs" / f"{key}.log"
    if key == "ours":
        env = stage_env(standalone_manifest(pipeline, stage, out / "ours-manifest"), stage, port,
                        extra={"STAGE_PROVIDERS": "cpu", "STAGE_GRPC_PORT": str(grpc_port)})
        return Server(key, stage_command(), env, port, log, grpc_port)
    command = [str(peer_python(key)), "-m", f"benchmarks.peer_servers.{key}_peer", "--pipeline", str(pipeline),
               "--stage", stage, "--host", HOST, "--port", str(port), "--threads", "1"]
    if key in ("kserve", "mlserver"):
        command += ["--grpc-port", str(grpc_port)]
    if key == "mlserver":
        command += ["--parallel-workers", str(mlserver_workers), "--workdir", str(out / "mlserver-config")]
    env["PYTHONPATH"] = str(REPO)
    return Server(key, command, env, port, log, grpc_port)


Load = Callable[[int, float], list[Sample]]


def load_for(server: Server, pipeline: Path, stage: str, encoding: str) -> Load:
    """A closed loop at (concurrency, seconds) against `server` in `encoding`, the same request every time."""
    if encoding != "grpc":
        workload = build(server.url, stage, binary=encoding == "binary")
        return lambda c, duration: _closed(workload, c, duration)
    tensors = random_tensors(load_manifest(pipeline).stage(stage).inputs, 1, 0)
    return lambda c, duration: grpc_load.run(f"{HOST}:{server.grpc_port}", stage, tensors, c, duration)


# ----------------------------------------------------------------------------------------------------- running


def _closed(workload: Any, concurrency: int, duration: float) -> list[Any]:
    return run(workload, LoadSettings(concurrency=concurrency, duration_s=duration, timeout_s=60.0))


def _pair_rows(pair: str | None, versions: dict[str, str], encodings: list[str]) -> list[dict[str, Any]]:
    keys = ["ours", *([pair] if pair else [])]
    return [{"server": key, "title": TITLES[key], "version": versions[key], "encoding": encoding, "pair": pair}
            for encoding in encodings for key in keys]


def _in_turns(loads: dict[str, Load], concurrency: int, duration: float,
              rounds: int) -> dict[str, tuple[list[Sample], float]]:
    """Each server's samples of `rounds` windows of duration / rounds at `concurrency`, the servers taking turns
    (the other first every other round), and the seconds its windows took in all (a closed loop's last requests
    end after its window: counted, for the throughput). The machine's phases (the 2-core VM's speed moves every
    half second or so) then fall on both alike, where one window each compared one phase with another."""
    samples: dict[str, list[Sample]] = {key: [] for key in loads}
    seconds = dict.fromkeys(loads, 0.0)
    keys = list(loads)
    window = duration / rounds
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            got = loads[key](concurrency, window)
            samples[key] += got
            seconds[key] += max([window, *[s.intended_s + s.latency_s for s in got]])
    return {key: (samples[key], seconds[key]) for key in keys}


def bench_pair(pair: str | None, args: argparse.Namespace, versions: dict[str, str]) -> list[dict[str, Any]]:
    """Ours and the peer `pair` (None: ours alone) up at once; per encoding both speak, each warmed up, then every
    concurrency level measured in turns (`_in_turns`); then both stopped. Rows: ours and the peer per encoding,
    each with the peak RSS of its process tree during that encoding."""
    out = args.out / (pair or "ours-alone")
    keys = ["ours", *([pair] if pair else [])]
    servers = {key: make_server(key, args.pipeline, args.stage, out, args.mlserver_parallel_workers) for key in keys}
    encodings = [e for e in ENCODINGS["ours"] if e in args.encodings and all(e in ENCODINGS[k] for k in keys)]
    rows = _pair_rows(pair, versions, encodings)
    err.print(f"[bold]{' and '.join(TITLES[k] for k in keys)}[/]: starting")
    try:
        for server in servers.values():
            server.start()
        startup = {key: server.wait_ready(args.stage, args.ready_timeout) for key, server in servers.items()}
        for encoding in encodings:
            loads = {key: load_for(server, args.pipeline, args.stage, encoding) for key, server in servers.items()}
            for key, server in servers.items():
                server.peak_rss = 0  # each encoding's own peak (the sampler keeps raising it from the tree's RSS)
                loads[key](1, args.warmup)
            runs: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
            for c in args.levels:
                duration = args.latency_duration if c == 1 else args.sweep_duration
                err.print(f"  {encoding}: concurrency {c}, {duration:g} s each, in {args.rounds} turns")
                for key, (samples, seconds) in _in_turns(loads, c, duration, args.rounds).items():
                    summary = report.summarize(samples, seconds, f"concurrency {c}")
                    summary["concurrency"] = c
                    runs[key].append(summary)
                    if summary["requests"] - summary["ok"]:
                        err.print(f"  [red]{key}: {summary['requests'] - summary['ok']} failed[/]: {summary['errors']}")
            time.sleep(0.6)  # one more RSS sample
            for row in rows:
                if row["encoding"] == encoding:
                    key = row["server"]
                    row.update(runs=runs[key], latency=runs[key][0], startup_s=startup[key],
                               peak_rss_bytes=servers[key].peak_rss)
    except (RuntimeError, TimeoutError, WorkloadError) as exc:
        err.print(f"  [red]{' and '.join(keys)} failed:[/] {exc}")
        for row in rows:
            row.setdefault("error", str(exc).splitlines()[0][:200])
    finally:
        for server in servers.values():
            server.stop()
    for row in rows:
        row["processes"] = servers[row["server"]].processes
    return rows


def plot(results: list[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("runs")]
    names = [f"{r['title']}\n{r['encoding']}" for r in ok]
    colors = ["tab:green" if r["server"] == "ours" else "tab:gray" for r in ok]
    panels = [
        ("p50 latency at concurrency 1, ms (lower is better)", [r["latency"]["latency_ms"]["p50"] for r in ok]),
        ("peak throughput, requests/s (higher is better)", [best(r["runs"])["throughput_rps"] for r in ok]),
        ("peak RSS of the server's processes under load, MiB", [(r.get("peak_rss_bytes") or 0) / 2**20 for r in ok]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, (label, values) in zip(axes, panels, strict=True):
        bars = ax.bar(range(len(ok)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(ok)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def rich_table(results: list[dict[str, Any]], levels: list[int], title: str) -> Table:
    t = Table(title=title)
    for col in ("server", "version", "encoding", "c=1 p50 ms", "c=1 p99 ms", "n",
                *[f"c={c} req/s" for c in levels], "peak RSS MiB", "procs", "errors", "in turns with"):
        t.add_column(col, justify="left" if col in ("server", "version", "encoding") else "right")
    for r in results:
        if not r.get("runs"):
            t.add_row(r["title"], r.get("version", "-"), r["encoding"], "[red]failed[/]", *[""] * (len(levels) + 4),
                      r.get("error", ""), _turns_with(r))
            continue
        lat = r["latency"]["latency_ms"]
        by_level = {run["concurrency"]: run for run in r["runs"]}
        errors = sum(run["requests"] - run["ok"] for run in r["runs"])
        t.add_row(r["title"], r["version"], r["encoding"], f"{lat['p50']:.1f}", f"{lat['p99']:.1f}",
                  str(r["latency"]["ok"]),
                  *[f"{by_level[c]['throughput_rps']:.1f}" if c in by_level else "-" for c in levels],
                  _fmt_mib(r.get("peak_rss_bytes")), str(r.get("processes", "-")), str(errors), _turns_with(r))
    return t


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",")]
    if not levels or levels[0] != 1 or any(c < 1 or c > 64 for c in levels):
        raise argparse.ArgumentTypeError("a comma list starting at 1, each at most 64, e.g. 1,4,8")
    return levels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=Path, required=True, help="pipeline directory (pipeline.json + stages)")
    p.add_argument("--stage", required=True, help="the stage every server serves, e.g. peers-block1-stage-1")
    p.add_argument("--out", type=Path, default=Path("build/bench-peers"))
    p.add_argument("--benchmarks", type=Path, default=Path("BENCHMARKS.md"), help="file whose section to update")
    p.add_argument("--servers", default="ours," + ",".join(PEERS),
                   help="comma list of ours,kserve,mlserver,ray (a peer whose venv is missing is skipped)")
    p.add_argument("--encodings", default="binary,json,grpc", help="comma list of binary,json,grpc")
    p.add_argument("--levels", type=_levels, default=[1, 4, 8], help="closed-loop concurrency sweep, from 1")
    p.add_argument("--latency-duration", type=float, default=10.0, help="seconds at concurrency 1")
    p.add_argument("--sweep-duration", type=float, default=6.0, help="seconds at each higher concurrency")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load before each encoding")
    p.add_argument("--rounds", type=int, default=4, choices=range(1, 21), metavar="1-20",
                   help="turns: each level's seconds are split into this many windows per server, taken in turns")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--mlserver-parallel-workers", type=int, default=0,
                   help="MLServer parallel_workers (0: inference in the server process; MLServer's default is 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in ENCODINGS]
    if unknown:
        err.print(f"error: unknown servers {unknown}; choose from {list(ENCODINGS)}")
        return 2
    try:
        load_manifest(args.pipeline).stage(args.stage)
    except (ManifestError, KeyError) as exc:
        err.print(f"error: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    results: list[dict[str, Any]] = []
    skipped = {}
    t0 = time.monotonic()
    peers = []
    for key in servers:
        if key != "ours" and not peer_python(key).exists():
            skipped[key] = f"{peer_python(key)} missing: run `make peers-venv`"
            err.print(f"[yellow]skipping {key}[/]: {skipped[key]}")
        elif key != "ours":
            peers.append(key)
    versions = {"ours": f"this repo @ {git_head()}", **{key: peer_version(key) for key in peers}}
    for pair in peers or [None]:
        results.extend(bench_pair(pair, args, versions))
    verdicts = compare(results)
    title = f"{args.stage} of {args.pipeline}, ours and one peer at a time in turns, closed loop ({machine})"
    meta = {
        "machine": machine, "pipeline": str(args.pipeline), "stage": args.stage, "levels": args.levels,
        "durations_s": {"warmup": args.warmup, "concurrency_1": args.latency_duration,
                        "sweep": args.sweep_duration}, "turns": args.rounds,
        "settings": {"onnxruntime": "intra_op 1, inter_op 1, sequential, ORT_ENABLE_ALL, CPU",
                     "mlserver_parallel_workers": args.mlserver_parallel_workers},
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "skipped": skipped, "elapsed_s": time.monotonic() - t0, "results": results, "target": verdicts,
    }
    (args.out / "peers.json").write_text(json.dumps(meta, indent=2) + "\n")
    load = f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    table_md = f"Machine: {machine}; {load}\n\n" + markdown(results, args.levels)
    (args.out / "table.md").write_text(table_md)
    update_section(args.benchmarks, "bench-peers", table_md + "\n" + verdict_markdown(verdicts))
    plot(results, args.out / "peers.png", title)
    console.print(rich_table(results, args.levels, title))
    for v in verdicts:
        mark = "[green]ahead[/]" if v["ours_ahead"] else "[red]NOT ahead[/]"
        console.print(f"ours vs {v['peer']} ({v['encoding']}): {mark} — peer p50 / ours "
                      f"{v['peer_p50_over_ours']:.2f}x, ours peak throughput / peer's "
                      f"{v['ours_throughput_over_peer']:.2f}x")
    console.print(f"wrote {args.out}/peers.json, table.md, peers.png ({time.monotonic() - t0:.0f} s)")
    return 1 if any(not r.get("runs") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
