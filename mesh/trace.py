"""One request's trace from the local mesh's span files, as a waterfall in the terminal.

Every stage process of the local mesh appends its spans as JSON lines to `<state-dir>/traces/<replica>.jsonl`
(`stage_service.tracing`, `STAGE_TRACE_FILE`). Here they are read back, one trace is picked (by the
request's `x-request-id`, its v2 `id`, a trace id or its prefix; or the last one), its spans are linked by
parent across processes, and `render_waterfall` draws each span indented under its parent with its
stage, duration, share of the whole and a bar on a common timeline.

Envoy's own spans are not in these files (Envoy has no file trace exporter); the hops through the sidecars
show as the gap between a stage's `forward` span and the next stage's server span.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mesh.local import TRACES_DIR

ATTR_REQUEST_ID = "meshpipe.request_id"
ATTR_INFER_ID = "meshpipe.infer.id"
ATTR_STATUS = "http.response.status_code"
ATTR_VERSION = "meshpipe.stage.version"
BAR_WIDTH = 40


class TraceError(Exception):
    """No span files, or no trace that matches."""


@dataclass
class SpanRecord:
    """One span as `stage_service.tracing.span_record` wrote it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str | None
    service: str
    attributes: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    children: list[SpanRecord] = field(default_factory=list, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpanRecord:
        status = data.get("status") or {}
        return cls(
            trace_id=str(data["trace_id"]), span_id=str(data["span_id"]),
            parent_span_id=data.get("parent_span_id"), name=str(data["name"]), kind=str(data.get("kind", "")),
            start_ns=int(data["start_ns"]), end_ns=int(data["end_ns"]),
            status=str(status.get("code", "UNSET")), status_message=status.get("message"),
            service=str(data.get("service") or "?"), attributes=dict(data.get("attributes") or {}),
            events=list(data.get("events") or []),
        )

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def error(self) -> bool:
        return self.status == "ERROR"


def span_files(state_dir: Path) -> list[Path]:
    """The span files of the mesh whose state directory this is."""
    return sorted((state_dir / TRACES_DIR).glob("*.jsonl"))


def load_spans(paths: Iterable[Path]) -> list[SpanRecord]:
    """Every complete span in these files; a line being written right now (cut short) is skipped."""
    spans = []
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    spans.append(SpanRecord.from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    continue
    return spans


@dataclass
class Trace:
    """One trace's spans, linked: `roots` are those whose parent is not among them (the caller's, or none)."""

    trace_id: str
    spans: list[SpanRecord]
    roots: list[SpanRecord]

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def request_id(self) -> str | None:
        for span in self.walk():
            if span.attributes.get(ATTR_REQUEST_ID):
                return str(span.attributes[ATTR_REQUEST_ID])
        return None

    def walk(self) -> list[SpanRecord]:
        """Depth first, children in start order: the waterfall's rows."""
        out: list[SpanRecord] = []

        def visit(span: SpanRecord) -> None:
            out.append(span)
            for child in span.children:
                visit(child)

        for root in self.roots:
            visit(root)
        return out

    def depth(self) -> dict[str, int]:
        depths: dict[str, int] = {}

        def visit(span: SpanRecord, d: int) -> None:
            depths[span.span_id] = d
            for child in span.children:
                visit(child, d + 1)

        for root in self.roots:
            visit(root, 0)
        return depths


def build_trace(spans: list[SpanRecord]) -> Trace:
    """Link the spans of one trace by parent (across processes: ids are the same everywhere)."""
    if not spans:
        raise TraceError("no spans")
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        span.children = []
    roots = []
    for span in sorted(spans, key=lambda s: (s.start_ns, s.end_ns)):
        parent = by_id.get(span.parent_span_id) if span.parent_span_id else None
        if parent is None or parent is span:
            roots.append(span)
        else:
            parent.children.append(span)
    return Trace(trace_id=spans[0].trace_id, spans=spans, roots=roots)


def group_traces(spans: list[SpanRecord]) -> dict[str, list[SpanRecord]]:
    grouped: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        grouped[span.trace_id].append(span)
    return grouped


def _matches(spans: list[SpanRecord], trace_id: str, wanted: str) -> bool:
    if len(wanted) >= 8 and trace_id.startswith(wanted.lower()):
        return True
    return any(wanted in (str(s.attributes.get(ATTR_REQUEST_ID, "")), str(s.attributes.get(ATTR_INFER_ID, "")))
               for s in spans)


def find_trace(spans: list[SpanRecord], request_id: str | None = None) -> Trace:
    """The trace of one request (x-request-id, v2 id, or trace id / prefix of 8+ hex digits), else the last.

    Where several traces match (a client that reused an id), the one that started last wins.
    """
    grouped = group_traces(spans)
    if request_id is not None:
        grouped = {t: ss for t, ss in grouped.items() if _matches(ss, t, request_id)}
        if not grouped:
            raise TraceError(f"no trace of request {request_id!r} among {len(spans)} spans")
    if not grouped:
        raise TraceError("no spans recorded yet: send a request through the mesh first")
    last = max(grouped, key=lambda t: min(s.start_ns for s in grouped[t]))
    return build_trace(grouped[last])


def recent_traces(spans: list[SpanRecord], limit: int = 20) -> list[Trace]:
    """The last `limit` traces, newest first."""
    traces = [build_trace(ss) for ss in group_traces(spans).values()]
    traces.sort(key=lambda t: t.start_ns, reverse=True)
    return traces[:limit]


def bar(start_ns: int, end_ns: int, t0: int, total_ns: int, width: int = BAR_WIDTH) -> str:
    """A span's place on the timeline: spaces before it, at least one block for it, spaces after."""
    if total_ns <= 0:
        return "█" * width
    first = min(width - 1, int((start_ns - t0) * width / total_ns))
    last = max(first + 1, min(width, -(-(end_ns - t0) * width // total_ns)))
    return " " * first + "█" * (last - first) + " " * (width - last)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


_KIND_STYLE = {"SERVER": "cyan", "CLIENT": "magenta", "INTERNAL": "green"}
ATTR_PIPELINE = "meshpipe.pipeline"
MIN_BAR = 10


def _labels(trace: Trace, compact: bool) -> tuple[dict[str, str], dict[str, str], int]:
    """Per span id: its name as shown and its `stage/version`; and the indent per level. Compact: the server
    span's route and the pipeline's name prefix left out, one space per level."""
    versions = {s.service: str(s.attributes[ATTR_VERSION]) for s in trace.spans if s.attributes.get(ATTR_VERSION)}
    pipelines = {str(s.attributes[ATTR_PIPELINE]) for s in trace.spans if s.attributes.get(ATTR_PIPELINE)}
    names, stages = {}, {}
    for span in trace.spans:
        stage = span.service
        name = span.name
        if compact:
            name = name.replace("/v2/models/{name}/", "…/")
            stage = next((stage.removeprefix(f"{p}-") for p in pipelines if stage.startswith(f"{p}-")), stage)
        version = versions.get(span.service)
        names[span.span_id] = name
        stages[span.span_id] = f"{stage}/{version}" if version else stage
    return names, stages, 1 if compact else 2


def render_waterfall(trace: Trace, width: int = BAR_WIDTH, compact: bool = False) -> RenderableType:
    """The waterfall: span (indented by parent), stage, ms, share of the total, and its bar of `width`."""
    t0, total = trace.start_ns, trace.duration_ns
    depths = trace.depth()
    services = {s.service for s in trace.spans}
    errors = [s for s in trace.spans if s.error]
    names, stages, indent = _labels(trace, compact)
    title = (f"trace {trace.trace_id}  request {trace.request_id or '-'}  {_ms(total)} ms  "
             f"{len(trace.spans)} spans in {len(services)} processes"
             + (f"  [bold red]{len(errors)} with errors[/]" if errors else ""))
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("span", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    axis = f"{_ms(total)} ms"
    table.add_column(f"0 {'timeline':^{max(0, width - 3 - len(axis))}} {axis}"
                     if width >= len(axis) + 12 else f"0 .. {axis}", no_wrap=True)
    for span in trace.walk():
        style = "bold red" if span.error else _KIND_STYLE.get(span.kind, "white")
        label = Text(" " * indent * depths[span.span_id])
        label.append(names[span.span_id], style="bold red" if span.error else None)
        status = span.attributes.get(ATTR_STATUS)
        if status is not None and (span.kind in ("SERVER", "CLIENT") or span.error):
            label.append(f" {status}", style="red" if span.error else "dim")
        share = span.duration_ns / total if total > 0 else 1.0
        table.add_row(label, stages[span.span_id], _ms(span.duration_ns), f"{share:6.1%}",
                      Text(bar(span.start_ns, span.end_ns, t0, total, width), style=style))
    parts: list[RenderableType] = [Text.from_markup(title), table]
    for span in errors:
        parts.append(Text(f"error in {span.service} {span.name}: {span.status_message or ''}", style="red"))
    return Group(*parts)


def fit_waterfall(trace: Trace, columns: int) -> RenderableType:
    """The waterfall in `columns` characters: full labels if the timeline keeps at least BAR_WIDTH, else
    compact labels and whatever the timeline can have (at least MIN_BAR)."""
    probe = max(BAR_WIDTH, len(_ms(trace.duration_ns)) + 15)  # wide enough for the timeline's own header
    for compact in (False, True):
        fixed = _measure(render_waterfall(trace, probe, compact)) - probe
        if columns - fixed >= BAR_WIDTH or compact:
            return render_waterfall(trace, max(MIN_BAR, min(BAR_WIDTH * 2, columns - fixed)), compact)
    raise AssertionError("unreachable")


def _measure(renderable: RenderableType) -> int:
    from rich.console import Console

    group = renderable.renderables if isinstance(renderable, Group) else [renderable]
    tables = [r for r in group if isinstance(r, Table)]
    return max(Console(width=10_000).measure(t).maximum for t in tables)


def waterfall_json(trace: Trace) -> dict[str, Any]:
    """The waterfall as data (`mesh trace --json`): each span with its depth, offset and duration in ms."""
    depths = trace.depth()
    return {"trace_id": trace.trace_id, "request_id": trace.request_id, "ms": trace.duration_ns / 1e6,
            "spans": [{"name": s.name, "service": s.service, "version": s.attributes.get(ATTR_VERSION),
                       "kind": s.kind, "depth": depths[s.span_id], "start_ms": (s.start_ns - trace.start_ns) / 1e6,
                       "ms": s.duration_ns / 1e6, "status": s.attributes.get(ATTR_STATUS), "error": s.error,
                       "message": s.status_message, "span_id": s.span_id, "parent_span_id": s.parent_span_id}
                      for s in trace.walk()]}


LIST_COLUMNS = ("request id", "trace id", "spans", "stages", "ms", "errors")
# Dropped in this order where the list does not fit: a request id is enough to pick a trace.
LIST_OPTIONAL = ("trace id", "spans")


def render_list(traces: list[Trace], columns: tuple[str, ...] = LIST_COLUMNS) -> RenderableType:
    """Recent traces: request id, trace id, spans, stages, total ms, errors (those of `columns`)."""
    table = Table(title="recent traces (newest first)", title_justify="left", show_edge=False, pad_edge=False)
    for col in columns:
        table.add_column(col, no_wrap=True, justify="right" if col in ("spans", "stages", "ms", "errors") else "left")
    for t in traces:
        errors = sum(s.error for s in t.spans)
        cells: dict[str, str | Text] = {
            "request id": t.request_id or "-", "trace id": t.trace_id, "spans": str(len(t.spans)),
            "stages": str(len({s.service for s in t.spans})), "ms": _ms(t.duration_ns),
            "errors": Text(str(errors), style="red" if errors else "")}
        table.add_row(*(cells[col] for col in columns))
    return table


def fit_list(traces: list[Trace], width: int) -> RenderableType:
    """The list with as many columns as fit `width`, dropping LIST_OPTIONAL in order."""
    columns: tuple[str, ...] = LIST_COLUMNS
    for drop in (None, *LIST_OPTIONAL):
        columns = tuple(c for c in columns if c != drop)
        table = render_list(traces, columns)
        if _measure(table) <= width:
            break
    return table


def list_json(traces: list[Trace]) -> list[dict[str, Any]]:
    return [{"request_id": t.request_id, "trace_id": t.trace_id, "spans": len(t.spans),
             "stages": len({s.service for s in t.spans}), "ms": t.duration_ns / 1e6,
             "errors": sum(s.error for s in t.spans)} for t in traces]
