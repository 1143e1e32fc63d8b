"""`python -m mesh trace`: one request's spans across every stage of the local mesh, as a waterfall."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mesh import local, state_dir
from mesh.cli_local import STATE_DIR_HELP
from mesh.trace import (
    BAR_WIDTH,
    MIN_BAR,
    TraceError,
    find_trace,
    fit_list,
    fit_waterfall,
    list_json,
    load_spans,
    recent_traces,
    render_waterfall,
    span_files,
    waterfall_json,
)
from model_export.cli_help import console_width

SETTLE_NS = 600_000_000
console = Console(width=console_width(sys.stdout))
err = Console(stderr=True, width=console_width(sys.stderr))


def register(sub: Any) -> None:
    """Add `trace` to the `python -m mesh` parser."""
    p = sub.add_parser(
        "trace", help="waterfall of one request's spans across all stages (local mesh)",
        description="Read the span files every stage process of the local mesh writes (<state-dir>/traces/) and "
        "draw one request's trace: each span under its parent, its stage, duration, share of the total, and "
        "its place on the timeline. Without REQUEST_ID, the last request.",
    )
    p.add_argument("request_id", nargs="?", default=None,
                   help="the request's x-request-id (Envoy's, echoed by the gateway), its v2 id, or a trace id "
                        "(default: the last request)")
    p.add_argument("--last", action="store_true", help="the last request (the default without REQUEST_ID)")
    p.add_argument("--list", type=int, nargs="?", const=20, default=None, metavar="N",
                   help="list the last N traces (N: 20 if left out) instead of drawing one")
    p.add_argument("--width", type=int, default=None,
                   help="timeline width in characters (default: what the terminal leaves, "
                        f"{MIN_BAR} to {2 * BAR_WIDTH})")
    p.add_argument("--wait", type=float, default=2.0,
                   help="seconds to wait for spans still being written (they reach the files within ~0.2 s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    p.set_defaults(func=_trace)


def _trace(args: argparse.Namespace) -> int:
    if args.last and args.request_id is not None:
        err.print("[bold red]error:[/] give a REQUEST_ID or --last, not both")
        return 2
    where = state_dir.find(args.state_dir)
    files = span_files(where)
    if not files:
        err.print(f"[bold red]error:[/] no span files under {where / local.TRACES_DIR}: is a mesh "
                  "running from there (python -m mesh up), or was it started with OTEL_SDK_DISABLED=true?",
                  highlight=False, soft_wrap=True)
        return 2
    if args.list is not None:
        traces = recent_traces(load_spans(files), args.list)
        if args.json:
            print(json.dumps(list_json(traces), indent=1))
        else:
            console.print(fit_list(traces, console.width))
        return 0
    # Spans reach the files within ~0.2 s of their end (stage_service.tracing.FILE_FLUSH_DELAY_MS): a request
    # answered just now may have some still queued, the outermost last. Read again until the trace settles.
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            trace = find_trace(load_spans(span_files(where)), args.request_id)
        except TraceError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            return 1
        if time.time_ns() - trace.end_ns >= SETTLE_NS or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if args.json:
        print(json.dumps(waterfall_json(trace), indent=1))
    elif args.width is not None:
        console.print(render_waterfall(trace, max(MIN_BAR, args.width)))
    else:
        console.print(fit_waterfall(trace, console.width))
    return 0
