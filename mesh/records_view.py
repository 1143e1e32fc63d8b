"""`mesh status`'s discovery records as a table (80 columns), as JSON, and refreshed (`--watch`)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from mesh.local import read_state
from mesh.records import Reading, read_records
from model_export.cli_help import compact_table, fits


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def clock(timestamp: float | None) -> str:
    return "never" if timestamp is None else datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M:%S")


def as_json(reading: Reading) -> dict[str, Any]:
    records = [{**r.as_dict(), "last_seen_healthy": iso(r.last_seen_healthy),
                "last_seen_healthy_unix": r.last_seen_healthy} for r in reading.records]
    return {"read_at": iso(reading.read_at), "records": records, "unreachable": reading.unreachable}


def render(reading: Reading, width: int) -> RenderableType:
    """The records per stage and version; the replica column only where it fits `width`."""
    head = Text(f"discovery records, read from the callers' Envoys at {clock(reading.read_at)} UTC")
    widest = ("service", "version", "weight", "address", "replica", "last healthy", "valid")
    for columns in (widest, tuple(c for c in widest if c != "replica")):
        table = compact_table(*columns, right=("weight",))
        for r in reading.records:
            cells = {"service": r.service, "version": r.version, "weight": f"{r.weight}%", "address": r.address,
                     "replica": r.replica or "-", "last healthy": clock(r.last_seen_healthy),
                     "valid": "yes" if r.valid else ("ejected" if r.ejected else "unhealthy")}
            table.add_row(*(cells[c] for c in columns))
        if fits(table, width):
            break
    parts: list[RenderableType] = [head, table]
    if reading.unreachable:
        parts.append(Text(f"no answer from the admin of: {', '.join(reading.unreachable)}"))
    return Group(*parts)


@contextmanager
def _until_interrupted() -> Iterator[threading.Event]:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets, so that the reading under way ends cleanly. Not
    KeyboardInterrupt: raised at any point of a reading (inside the admin client's connection pool, say), it can
    leave a lock taken that closing the client then waits on: `--watch` once hung on exit that way in the tests."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch(state_dir: Path, console: Console, interval_s: float, as_lines_of_json: bool) -> int:
    """Read and show the records every `interval_s` until interrupted (Ctrl-C) or the mesh is gone."""
    with _until_interrupted() as stop:
        if as_lines_of_json:
            while not stop.is_set() and (state := read_state(state_dir)) is not None:
                print(json.dumps(as_json(read_records(state, state_dir))), flush=True)
                stop.wait(interval_s)
            return 0
        if not console.is_terminal:  # a pipe or a log: one table per reading
            while not stop.is_set() and (state := read_state(state_dir)) is not None:
                console.print(render(read_records(state, state_dir), console.width), soft_wrap=True)
                console.file.flush()
                stop.wait(interval_s)
            return 0
        with Live(console=console, auto_refresh=False) as live:
            while not stop.is_set() and (state := read_state(state_dir)) is not None:
                live.update(render(read_records(state, state_dir), console.width), refresh=True)
                stop.wait(interval_s)
    return 0

