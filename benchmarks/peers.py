"""`python -m benchmarks.peers`: our stage service against MLServer, KServe and Ray Serve on the same stage.

    python -m benchmarks.peers --pipeline build/peers-block1 --stage peers-block1-stage-1 --out build/bench-peers

Every server serves the same stage ONNX file in an onnxruntime session with the same options (1 intra-op
thread, 1 inter-op, sequential, every graph optimization) over KServe v2 REST, on a free 127.0.0.1 port. The
peers run from their own venvs (`.venv-peers/<peer>`, made by `make peers-venv`); this driver and the load
generator run from the product's venv. One server at a time: start, wait until ready, then per encoding it
speaks (binary tensor extension and/or JSON): warm up, a closed loop at concurrency 1 (p50/p99 latency), a short
sweep of higher concurrency (throughput at saturation), all with the same request bodies; then stop it. The
peak RSS of the server's whole process tree, sampled from /proc every 0.5 s, is reported per encoding.

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
    """For every peer row, ours in the same encoding: p50 at concurrency 1 and peak throughput, as ratios,
    and whether ours is ahead in both (the target)."""
    ours = {r["encoding"]: r for r in results if r["server"] == "ours" and r.get("runs")}
    verdicts = []
    for r in results:
        mine = ours.get(r["encoding"])
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
            *[f"c={c} req/s" for c in levels], "peak req/s", "peak RSS MiB", "processes"]
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
            _fmt_mib(r.get("peak_rss_bytes")), str(r.get("processes", "-")),
        ]) + " |")
    return "\n".join(lines) + "\n"


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


def bench_server(key: str, args: argparse.Namespace, version: str) -> list[dict[str, Any]]:
    server = make_server(key, args.pipeline, args.stage, args.out, args.mlserver_parallel_workers)
    encodings = [e for e in ENCODINGS[key] if e in args.encodings]
    rows: list[dict[str, Any]] = [
        {"server": key, "title": TITLES[key], "version": version, "encoding": e} for e in encodings
    ]
    err.print(f"[bold]{TITLES[key]}[/] {version}: starting")
    try:
        server.start()
        startup = server.wait_ready(args.stage, args.ready_timeout)
        for row in rows:
            server.peak_rss = 0  # each encoding's own peak (the sampler keeps raising it from the tree's RSS)
            load = load_for(server, args.pipeline, args.stage, row["encoding"])
            load(1, args.warmup)
            runs = []
            for c in args.levels:
                duration = args.latency_duration if c == 1 else args.sweep_duration
                err.print(f"  {row['encoding']}: concurrency {c}, {duration:g} s")
                summary = report.summarize(load(c, duration), duration, f"concurrency {c}")
                summary["concurrency"] = c
                runs.append(summary)
                failed = summary["requests"] - summary["ok"]
                if failed:
                    err.print(f"  [red]{failed} failed[/]: {summary['errors']}")
            time.sleep(0.6)  # one more RSS sample
            row.update(runs=runs, latency=runs[0], startup_s=startup, peak_rss_bytes=server.peak_rss)
    except (RuntimeError, TimeoutError, WorkloadError) as exc:
        err.print(f"  [red]{key} failed:[/] {exc}")
        for row in rows:
            row.setdefault("error", str(exc).splitlines()[0][:200])
    finally:
        server.stop()
    for row in rows:
        row["processes"] = server.processes
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
                *[f"c={c} req/s" for c in levels], "peak RSS MiB", "procs", "errors"):
        t.add_column(col, justify="left" if col in ("server", "version", "encoding") else "right")
    for r in results:
        if not r.get("runs"):
            t.add_row(r["title"], r.get("version", "-"), r["encoding"], "[red]failed[/]", *[""] * (len(levels) + 5),
                      r.get("error", ""))
            continue
        lat = r["latency"]["latency_ms"]
        by_level = {run["concurrency"]: run for run in r["runs"]}
        errors = sum(run["requests"] - run["ok"] for run in r["runs"])
        t.add_row(r["title"], r["version"], r["encoding"], f"{lat['p50']:.1f}", f"{lat['p99']:.1f}",
                  str(r["latency"]["ok"]),
                  *[f"{by_level[c]['throughput_rps']:.1f}" if c in by_level else "-" for c in levels],
                  _fmt_mib(r.get("peak_rss_bytes")), str(r.get("processes", "-")), str(errors))
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
    for key in servers:
        if key != "ours" and not peer_python(key).exists():
            skipped[key] = f"{peer_python(key)} missing: run `make peers-venv`"
            err.print(f"[yellow]skipping {key}[/]: {skipped[key]}")
            continue
        version = f"this repo @ {git_head()}" if key == "ours" else peer_version(key)
        results.extend(bench_server(key, args, version))
    verdicts = compare(results)
    title = f"{args.stage} of {args.pipeline}, one server at a time, closed loop ({machine})"
    meta = {
        "machine": machine, "pipeline": str(args.pipeline), "stage": args.stage, "levels": args.levels,
        "durations_s": {"warmup": args.warmup, "concurrency_1": args.latency_duration,
                        "sweep": args.sweep_duration},
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
