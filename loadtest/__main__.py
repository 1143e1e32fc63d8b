"""`python -m loadtest run --url URL --model NAME (--rate R | --concurrency C[,C...]) --duration S`

Open loop with --rate (latency from the intended send time), closed loop with --concurrency (a comma
list sweeps it). Writes summary.json, samples.json and PNG plots to --out, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest import report
from loadtest.machine import describe
from loadtest.runner import LoadSettings, run
from loadtest.workload import Access, WorkloadError, build
from model_export.cli_help import DefaultsHelpFormatter, console_width
from model_export.manifest import ManifestError

console = Console(width=console_width(sys.stdout))
err = Console(stderr=True)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list such as 1,2,4, got {text!r}") from None
    if not levels or any(c < 1 or c > 1024 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency must be between 1 and 1024, got {text!r}")
    return levels


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="send bounded load to one KServe v2 model and report",
                       formatter_class=DefaultsHelpFormatter)
    r.add_argument("--url", required=True, help="base URL, e.g. https://127.0.0.1:8080")
    r.add_argument("--token", default=None,
                   help="sent as `Authorization: Bearer TOKEN` with every request (`python -m mesh token` mints one "
                        "for the local mesh's gateway)")
    r.add_argument("--cacert", type=Path, default=None,
                   help="CA file to check the server's certificate against, e.g. .mesh/pki/ca.pem (default: the "
                        "system's CAs)")
    r.add_argument("--model", required=True, help="model name: a stage, or the pipeline at the gateway")
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=_positive, help="open loop: requests per second")
    mode.add_argument("--concurrency", type=_levels, help="closed loop: clients (comma list sweeps)")
    r.add_argument("--duration", type=_positive, required=True, help="seconds per run")
    enc = r.add_mutually_exclusive_group()
    enc.add_argument("--binary", dest="binary", action="store_true", default=True, help="binary tensors (default)")
    enc.add_argument("--json", dest="binary", action="store_false", help="JSON tensors")
    r.add_argument("--out", type=Path, help="directory for summary.json, samples.json and plots (default: none)")
    r.add_argument("--batch", type=int, default=1, help="samples per request")
    r.add_argument("--pipeline", type=Path, help="pipeline directory: check sampled outputs against the whole model")
    r.add_argument("--check-fraction", type=float, default=0.05, help="share of responses checked (with --pipeline)")
    r.add_argument("--max-requests", type=int, default=100_000, help="hard bound on requests per run")
    r.add_argument("--timeout", type=_positive, default=30.0, help="per-request timeout, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 <= args.check_fraction <= 1:
        err.print("error: --check-fraction must be between 0 and 1")
        return 2
    try:
        workload = build(args.url, args.model, binary=args.binary, batch=args.batch, pipeline=args.pipeline,
                         access=Access(ca=args.cacert, token=args.token))
    except (WorkloadError, ManifestError, OSError, ssl.SSLError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    base = LoadSettings(rate=args.rate, duration_s=args.duration, timeout_s=args.timeout,
                        max_requests=args.max_requests,
                        check_fraction=args.check_fraction if args.pipeline else 0.0)
    runs = [(f"rate {args.rate:g}/s", base)] if args.rate else [
        (f"concurrency {c}", replace(base, concurrency=c)) for c in args.concurrency
    ]
    summaries, all_samples = [], {}
    encoding = "binary" if args.binary else "json"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    for label, settings in runs:
        expected = min(int((settings.rate or 0) * settings.duration_s), settings.max_requests) or None
        with Progress(*columns, console=err) as progress:
            task = progress.add_task(f"{label}, {settings.duration_s:g}s", total=expected)
            samples = run(workload, settings, partial(progress.advance, task))
        summaries.append(report.summarize(samples, settings.duration_s, label))
        all_samples[label] = samples
    title = f"{args.model} at {args.url} ({encoding}, batch {args.batch})"
    console.print(report.table(summaries, title, console.width))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"url": args.url, "model": args.model, "encoding": encoding, "batch": args.batch,
                "machine": describe(), "runs": summaries}
        (args.out / "summary.json").write_text(json.dumps(meta, indent=2) + "\n")
        (args.out / "samples.json").write_text(json.dumps(
            {label: [asdict(s) for s in samples] for label, samples in all_samples.items()}) + "\n")
        for label, samples in all_samples.items():
            report.plot_run(samples, args.out / f"latency-{label.replace(' ', '-').replace('/', '')}.png",
                            f"{title}: {label}")
        if args.concurrency and len(args.concurrency) > 1:
            report.plot_sweep(summaries, args.concurrency, args.out / "sweep.png", title)
        console.print(f"wrote {args.out}/summary.json, samples.json and plots")
    failed = sum(s["requests"] - s["ok"] for s in summaries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
