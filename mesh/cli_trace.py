"""`python -m mesh trace`: one request's spans across every stage of the local mesh, as a waterfall."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mesh import local
from mesh.trace import (
    BAR_WIDTH,
    TraceError,
    find_trace,
    load_spans,
    recent_traces,
    render_list,
    render_waterfall,
    span_files,
)

SETTLE_NS = 600_000_000
console = Console()
err = Console(stderr=True)


def register(sub: Any) -> None:
    """Add `trace` to the `python -m mesh` parser."""
    p = sub.add_parser(
        "trace", help="waterfall of one request's spans across all stages (local mesh)",
        description="Read the span files every stage process of the local mesh writes (<state-dir>/traces/) and "
        "draw one request's trace: each span under its parent, its stage, duration, share of the total, and "
        "its place on the timeline. Without REQUEST_ID, the last request.",
    )
    p.add_argument("request_id", nargs="?", default=None,
                   help="the request's x-request-id (Envoy's, echoed by the gateway), its v2 id, or a trace id")
    p.add_argument("--last", action="store_true", help="the last request (the default without REQUEST_ID)")
    p.add_argument("--list", type=int, nargs="?", const=20, default=None, metavar="N",
                   help="list the last N traces (default 20) instead of drawing one")
    p.add_argument("--width", type=int, default=BAR_WIDTH, help=f"timeline width in characters (default {BAR_WIDTH})")
    p.add_argument("--wait", type=float, default=2.0,
                   help="seconds to wait for spans still being written (they reach the files within ~0.2 s)")
    p.add_argument("--state-dir", type=Path, default=local.DEFAULT_STATE_DIR,
                   help="the mesh's state directory (default: .mesh)")
    p.set_defaults(func=_trace)


def _trace(args: argparse.Namespace) -> int:
    if args.last and args.request_id is not None:
        err.print("[bold red]error:[/] give a REQUEST_ID or --last, not both")
        return 2
    files = span_files(args.state_dir)
    if not files:
        err.print(f"[bold red]error:[/] no span files under {args.state_dir / local.TRACES_DIR}: is a mesh "
                  "running from there (python -m mesh up), or was it started with OTEL_SDK_DISABLED=true?")
        return 2
    if args.list is not None:
        console.print(render_list(recent_traces(load_spans(files), args.list)))
        return 0
    # Spans reach the files within ~0.2 s of their end (stage_service.tracing.FILE_FLUSH_DELAY_MS): a request
    # answered just now may have some still queued, the outermost last. Read again until the trace settles.
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            trace = find_trace(load_spans(span_files(args.state_dir)), args.request_id)
        except TraceError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            err.print(f"[bold red]error:[/] {exc}")
            return 1
        if time.time_ns() - trace.end_ns >= SETTLE_NS or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    console.print(render_waterfall(trace, max(10, args.width)))
    return 0
