"""`python -m mesh trace`: finding one request's trace in span files and drawing its waterfall.

Unit tests on hand-written span records (the format `stage_service.tracing.span_record` writes), then one
through the real local mesh (Envoy gateway and sidecars, three stage processes writing their own files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from mesh import cli_trace
from mesh.__main__ import main
from mesh.local import TRACES_DIR
from mesh.trace import TraceError, bar, find_trace, load_spans, recent_traces, render_waterfall, span_files
from mesh.v2client import infer
from model_export.manifest import Manifest
from tests.mesh.local_mesh import gateway_client, mesh_cli, running_mesh

MS = 1_000_000
T0 = 1_700_000_000_000_000_000
T1_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
T0_ID = "80f198ee56343ba864fe8b2a57d3eff7"


def span(trace_id: str, span_id: str, parent: str | None, name: str, kind: str, service: str, start_ms: float,
         end_ms: float, *, error: str | None = None, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "trace_id": trace_id, "span_id": span_id, "parent_span_id": parent, "name": name, "kind": kind,
        "start_ns": T0 + int(start_ms * MS), "end_ns": T0 + int(end_ms * MS),
        "status": {"code": "ERROR" if error else "UNSET", "message": error},
        "attributes": attrs or {}, "events": [{"name": "exception", "time_ns": 0, "attributes": {}}] if error else [],
        "service": service,
    }


def write_state(state_dir: Path) -> Path:
    """Two processes' files: an earlier request (rid-0) that went fine, the last (rid-1) failing in stage b."""
    traces = state_dir / TRACES_DIR
    traces.mkdir(parents=True)
    a = [
        span(T0_ID, "00000000000000a0", None, "POST /infer", "SERVER", "stage-a", -1000, -990, attrs={
            "meshpipe.request_id": "rid-0", "meshpipe.stage.version": "v1", "http.response.status_code": 200}),
        span(T1_ID, "00000000000000a1", None, "POST /infer", "SERVER", "stage-a", 0, 100, error="next stage failed",
             attrs={"meshpipe.request_id": "rid-1", "meshpipe.stage.version": "v1", "http.response.status_code": 502}),
        span(T1_ID, "00000000000000a2", "00000000000000a1", "decode", "INTERNAL", "stage-a", 1, 2),
        span(T1_ID, "00000000000000a3", "00000000000000a1", "forward", "CLIENT", "stage-a", 10, 85,
             error="next stage stage-b answered 500: boom", attrs={"http.response.status_code": 500}),
    ]
    b = [
        span(T1_ID, "00000000000000b1", "00000000000000a3", "POST /infer", "SERVER", "stage-b", 20, 80,
             error="inference failed in stage-b: boom",
             attrs={"meshpipe.request_id": "rid-1", "meshpipe.stage.version": "v2", "http.response.status_code": 500}),
        span(T1_ID, "00000000000000b2", "00000000000000b1", "inference", "INTERNAL", "stage-b", 30, 70,
             error="inference failed in stage-b: boom"),
    ]
    # stage-b's file ends with a line still being written: it is skipped, not an error
    (traces / "stage-a-v1-0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in a))
    (traces / "stage-b-v2-0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in b) + '{"trace_id": "4bf9')
    return traces


def test_find_by_request_id_trace_id_or_last(tmp_path: Path) -> None:
    write_state(tmp_path)
    spans = load_spans(span_files(tmp_path))
    assert len(spans) == 6
    assert find_trace(spans).trace_id == T1_ID  # --last: the trace that started last
    assert find_trace(spans, "rid-1").trace_id == T1_ID
    assert find_trace(spans, "rid-0").trace_id == T0_ID
    assert find_trace(spans, T0_ID[:8]).trace_id == T0_ID
    with pytest.raises(TraceError, match="no trace of request 'rid-9'"):
        find_trace(spans, "rid-9")
    with pytest.raises(TraceError, match="no spans recorded"):
        find_trace([])
    assert [t.request_id for t in recent_traces(spans)] == ["rid-1", "rid-0"]


def test_spans_linked_across_processes_in_waterfall_order(tmp_path: Path) -> None:
    write_state(tmp_path)
    trace = find_trace(load_spans(span_files(tmp_path)), "rid-1")
    assert [s.span_id for s in trace.roots] == ["00000000000000a1"]
    rows = [(s.service, s.name) for s in trace.walk()]
    assert rows == [("stage-a", "POST /infer"), ("stage-a", "decode"), ("stage-a", "forward"),
                    ("stage-b", "POST /infer"), ("stage-b", "inference")]
    depth = trace.depth()
    assert [depth[s.span_id] for s in trace.walk()] == [0, 1, 1, 2, 3]
    assert trace.duration_ns == 100 * MS


def test_bar_is_placed_on_the_timeline() -> None:
    assert bar(0, 100, 0, 100, 10) == "█" * 10
    assert bar(10, 85, 0, 100, 10) == " " + "█" * 8 + " "
    assert bar(1, 2, 0, 100, 10) == "█" + " " * 9  # shorter than a cell: still one block
    assert bar(99, 100, 0, 100, 10) == " " * 9 + "█"
    assert bar(5, 5, 5, 0, 4) == "████"  # a trace of one instantaneous span


def test_waterfall_shows_indent_stage_duration_share_bar_and_errors(tmp_path: Path) -> None:
    write_state(tmp_path)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_waterfall(find_trace(load_spans(span_files(tmp_path)), "rid-1"), width=20))
    text = console.export_text()
    lines = text.splitlines()
    assert f"trace {T1_ID}  request rid-1  100.000 ms  5 spans in 2 processes  4 with errors" in lines[0]
    row = {name: next(line for line in lines if line.lstrip().startswith(name) and "│" in line)
           for name in ("POST /infer 502", "decode", "forward 500", "POST /infer 500", "inference")}
    cells = {k: [c.strip() for c in v.split("│")] for k, v in row.items()}
    assert cells["POST /infer 502"][1:4] == ["stage-a/v1", "100.000", "100.0%"]
    assert cells["forward 500"][1:4] == ["stage-a/v1", "75.000", "75.0%"]
    assert cells["POST /infer 500"][1:4] == ["stage-b/v2", "60.000", "60.0%"]
    assert cells["inference"][1:4] == ["stage-b/v2", "40.000", "40.0%"]
    # indentation follows the parent chain, across the process boundary
    indent = {k: len(v.split("│")[0]) - len(v.split("│")[0].lstrip()) for k, v in row.items()}
    assert indent == {"POST /infer 502": 0, "decode": 2, "forward 500": 2, "POST /infer 500": 4, "inference": 6}
    assert row["forward 500"].split("│")[4][1:].rstrip() == "  " + "█" * 15  # [1:]: the cell's padding
    assert "error in stage-b inference: inference failed in stage-b: boom" in text
    assert "error in stage-a forward: next stage stage-b answered 500: boom" in text


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_state(tmp_path / "state")
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    monkeypatch.setattr(cli_trace, "console", console)
    assert main(["trace", "rid-0", "--state-dir", str(tmp_path / "state")]) == 0
    assert f"trace {T0_ID}  request rid-0" in console.export_text()
    assert main(["trace", "--last", "--state-dir", str(tmp_path / "state")]) == 0
    assert f"trace {T1_ID}  request rid-1" in console.export_text()
    assert main(["trace", "--list", "--state-dir", str(tmp_path / "state")]) == 0
    listed = console.export_text()
    assert listed.index("rid-1") < listed.index("rid-0")
    assert main(["trace", "rid-9", "--wait", "0", "--state-dir", str(tmp_path / "state")]) == 1
    assert "no trace of request 'rid-9'" in capsys.readouterr().err.replace("\n", "")
    assert main(["trace", "rid-1", "--last", "--state-dir", str(tmp_path / "state")]) == 2
    assert main(["trace", "--state-dir", str(tmp_path / "empty")]) == 2
    assert "no span files" in capsys.readouterr().err.replace("\n", "")


def test_waterfall_of_a_request_through_the_local_mesh(tiny_pipeline: tuple[Path, Manifest],
                                                        tmp_path: Path) -> None:
    """`mesh up` turns on the span files by default; one request through the Envoy gateway and sidecars
    gives one trace across the three stage processes, drawn by `mesh trace --last` and found by its id."""
    pipeline = tmp_path / "tiny"
    shutil.copytree(tiny_pipeline[0], pipeline)
    state_dir = tmp_path / ".mesh"
    with running_mesh(pipeline, None, state_dir) as state:
        x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
        with gateway_client(state_dir) as client:
            infer(client, state.layout.gateway_url, "tiny", {"x": x})
        result = mesh_cli("trace", "--last", "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        files = span_files(state_dir)
        assert len(files) == 3  # one per stage replica, named by replica
        trace = find_trace(load_spans(files))
    rows = [(s.service, s.name) for s in trace.walk()]
    assert rows == [("tiny-stage-0", "POST /v2/models/{name}/infer"), ("tiny-stage-0", "decode"),
                    ("tiny-stage-0", "inference"), ("tiny-stage-0", "forward"),
                    ("tiny-stage-1", "POST /v2/models/{name}/infer"), ("tiny-stage-1", "decode"),
                    ("tiny-stage-1", "inference"), ("tiny-stage-1", "forward"),
                    ("tiny-stage-2", "POST /v2/models/{name}/infer"), ("tiny-stage-2", "decode"),
                    ("tiny-stage-2", "inference"), ("tiny-stage-2", "encode"),
                    ("tiny-stage-1", "encode"), ("tiny-stage-0", "encode")]
    assert len(trace.roots) == 1
    request_id = trace.request_id
    assert request_id  # Envoy's x-request-id, carried to every stage
    assert {s.attributes.get("meshpipe.request_id") for s in trace.spans if s.kind == "SERVER"} == {request_id}
    out = result.stdout
    assert f"trace {trace.trace_id}  request {request_id}" in out
    for stage in ("tiny-stage-0/v1", "tiny-stage-1/v1", "tiny-stage-2/v1"):
        assert stage in out
    assert "100.0%" in out
