"""Tracing across real stage processes: one trace per request, parents linked across process boundaries,
W3C and B3 on the wire, errors on the span of the stage that failed; and the set-up from OTEL_* variables.

The chain: tiny-stage-0 -> test proxy (stands where Envoy would, records the headers it got) -> tiny-stage-1
-> tiny-stage-2, the last one served from a STAGE_FILE that computes the same y but fails at run time when
its input exceeds 1e6 (an impossible Reshape), so one request can fail in stage 2 and only there.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_export.manifest import Manifest
from stage_service.errors import StartupError
from stage_service.tracing import StageTracing, build_processors, build_propagator
from tests.stage_service.procs import StageProcess, start_fake_stage, start_stage
from tests.tiny import IR_VERSION, OPSET, dense_stage_graph

FAIL_ABOVE = 1e6


def failing_last_stage(path: Path) -> Path:
    """tiny-stage-2's own graph (same weights, same contract), plus a Reshape that cannot be done when
    max(h2) > FAIL_ABOVE (onnxruntime: RUNTIME_EXCEPTION, so a 500); warm-up on zeros and ordinary inputs pass."""
    dense = dense_stage_graph(2, "h2", "y_dense", 24, 4, 2)
    g = dense.graph
    g.node.extend([
        helper.make_node("ReduceMax", ["h2"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "limit"], ["over"]),
        helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["over_i", "one_i"], ["n"]),
        helper.make_node("Unsqueeze", ["n", "axis0"], ["shape"]),
        helper.make_node("Reshape", ["one_zero", "shape"], ["r"]),  # 1 element into shape [2]: fails
        helper.make_node("ReduceSum", ["r"], ["z"], keepdims=0),
        helper.make_node("Add", ["y_dense", "z"], ["y"]),
    ])
    g.initializer.extend([numpy_helper.from_array(np.array(FAIL_ABOVE, np.float32), "limit"),
                          numpy_helper.from_array(np.array(1, np.int64), "one_i"),
                          numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                          numpy_helper.from_array(np.zeros(1, np.float32), "one_zero")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def traced(tiny_pipeline: tuple[Path, Manifest],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[StageProcess], StageProcess, Path]]:
    """(stages 0..2, the proxy between stage 0 and 1, the directory of their span files)."""
    directory, _ = tiny_pipeline
    manifest = directory / "pipeline.json"
    work = tmp_path_factory.mktemp("traced")
    traces = work / "traces"
    env = {"STAGE_TRACE_FILE": str(traces / "{stage}-{pid}.jsonl")}
    bad = failing_last_stage(work / "stage-2-failing.onnx")
    started: list[StageProcess] = []
    try:
        started.append(start_stage(manifest, "tiny-stage-2", env={**env, "STAGE_FILE": str(bad)}, log_dir=work))
        started.append(start_stage(manifest, "tiny-stage-1", next_url=started[-1].url, env=env, log_dir=work))
        proxy = start_fake_stage(started[-1].url, log_dir=work)
        started.append(proxy)
        started.append(start_stage(manifest, "tiny-stage-0", next_url=proxy.url, env=env, log_dir=work))
        yield [started[3], started[1], started[0]], proxy, traces
    finally:
        codes = [p.stop() for p in reversed(started)]
    assert codes[0] == 0 and codes[2:] == [0, 0], "\n".join(p.log() for p in started)


def read_spans(traces: Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(traces.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            spans.append(json.loads(line))
    return spans


def spans_of(traces: Path, request_id: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Every span of the trace whose server spans carry this x-request-id, once `count` have been written."""
    deadline = time.monotonic() + timeout
    while True:
        spans = read_spans(traces)
        ids = {s["trace_id"] for s in spans if s["attributes"].get("meshpipe.request_id") == request_id}
        found = [s for s in spans if s["trace_id"] in ids]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(ids) == 1, f"request {request_id}: trace ids {ids}"
            return found
        time.sleep(0.1)


def post(stage: StageProcess, x: np.ndarray, headers: dict[str, str]) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    return httpx.post(f"{stage.url}/v2/models/tiny/infer", json=body, headers=headers, timeout=30.0)


def one(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any]:
    found = [s for s in spans if s["service"] == service and s["name"] == name]
    assert len(found) == 1, f"{service} {name}: {len(found)} spans"
    return found[0]


SERVER = "POST /v2/models/{name}/infer"
STAGES = ["tiny-stage-0", "tiny-stage-1", "tiny-stage-2"]


def test_one_trace_across_three_processes_linked_by_parent(traced: tuple[list[StageProcess], StageProcess, Path],
                                                           reference: Callable[..., np.ndarray]) -> None:
    stages, _, traces = traced
    rid = f"req-{uuid.uuid4()}"
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    r = post(stages[0], x, {"x-request-id": rid})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 4), reference(x), atol=1e-5)
    assert r.headers["x-stage-timing"].count("=") == 3  # the timing header is unchanged by tracing

    # 3 servers with decode/inference/encode each, and 2 forwards: all in one trace, from three processes
    spans = spans_of(traces, rid, 14)
    assert len(spans) == 14
    assert len({s["trace_id"] for s in spans}) == 1
    assert {s["service"] for s in spans} == set(STAGES)
    servers = [one(spans, st, SERVER) for st in STAGES]
    forwards = [one(spans, st, "forward") for st in STAGES[:2]]
    assert not [s for s in spans if s["service"] == "tiny-stage-2" and s["name"] == "forward"]

    assert servers[0]["parent_span_id"] is None  # the request carried no context: stage 0 starts the trace
    for i in (1, 2):  # across process boundaries: stage i's server span is a child of stage i-1's forward span
        assert servers[i]["parent_span_id"] == forwards[i - 1]["span_id"]
        assert servers[i]["parent_remote"] is True
    for i, stage in enumerate(STAGES):  # in process: the steps are children of the stage's server span
        for name in ("decode", "inference", "encode"):
            child = one(spans, stage, name)
            assert child["parent_span_id"] == servers[i]["span_id"] and child["kind"] == "INTERNAL"
        if i < 2:
            assert forwards[i]["parent_span_id"] == servers[i]["span_id"] and forwards[i]["kind"] == "CLIENT"
        assert servers[i]["kind"] == "SERVER"
        assert servers[i]["start_ns"] <= servers[i]["end_ns"]
    for span in spans:
        assert span["status"]["code"] == "UNSET", span

    a = [s["attributes"] for s in servers]
    assert [x["meshpipe.stage"] for x in a] == STAGES
    assert [x["meshpipe.stage.version"] for x in a] == ["v1"] * 3
    assert [x["meshpipe.stage.index"] for x in a] == [0, 1, 2]
    assert [x["meshpipe.request_id"] for x in a] == [rid] * 3  # x-request-id travels on every hop
    assert [x["http.response.status_code"] for x in a] == [200] * 3
    assert [x["meshpipe.tensor.bytes_in"] for x in a] == [2 * 16 * 4, 2 * 32 * 4, 2 * 24 * 4]
    assert [x["meshpipe.tensor.bytes_out"] for x in a] == [2 * 4 * 4] * 3  # every stage returns the final y
    assert forwards[0]["attributes"]["meshpipe.next_stage"] == "tiny-stage-1"
    assert forwards[0]["attributes"]["http.response.status_code"] == 200


def test_forward_sends_w3c_and_b3_of_its_own_span(traced: tuple[list[StageProcess], StageProcess, Path]) -> None:
    """What stage 0 put on the wire (seen by the proxy, where Envoy would stand): both formats, same span."""
    stages, proxy, traces = traced
    rid = f"req-{uuid.uuid4()}"
    stale = {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1", "x-b3-parentspanid": "05e3ac9a4f6e3b90"}
    r = post(stages[0], np.ones((1, 16), np.float32), {"x-request-id": rid, **stale})
    assert r.status_code == 200, r.text
    seen = httpx.get(f"{proxy.url}/_fake/seen").json()
    spans = spans_of(traces, rid, 14)
    forward = one(spans, "tiny-stage-0", "forward")
    assert seen["traceparent"] == f"00-{forward['trace_id']}-{forward['span_id']}-01"
    assert seen["x-b3-traceid"] == forward["trace_id"]
    assert seen["x-b3-spanid"] == forward["span_id"]
    assert seen["x-b3-sampled"] == "1"
    assert seen["x-request-id"] == rid
    # the caller's B3 context was continued (same trace id), and its stale headers were not passed on
    assert forward["trace_id"] == "80f198ee56343ba864fe8b2a57d3eff7"
    assert one(spans, "tiny-stage-0", SERVER)["parent_span_id"] == "e457b5a2e4d86bd1"
    assert "b3" not in seen and "x-b3-parentspanid" not in seen


@pytest.mark.parametrize("fmt", ["w3c", "b3"])
def test_incoming_context_is_continued(traced: tuple[list[StageProcess], StageProcess, Path], fmt: str) -> None:
    """A caller's trace (an app's W3C traceparent, or the B3 headers Istio's sidecars send) goes on through
    every stage."""
    stages, _, traces = traced
    rid = f"req-{uuid.uuid4()}"
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = ({"traceparent": f"00-{trace_id}-{parent}-01"} if fmt == "w3c"
               else {"x-b3-traceid": trace_id, "x-b3-spanid": parent, "x-b3-sampled": "1"})
    assert post(stages[0], np.ones((1, 16), np.float32), {"x-request-id": rid, **headers}).status_code == 200
    spans = spans_of(traces, rid, 14)
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert one(spans, "tiny-stage-0", SERVER)["parent_span_id"] == parent


def test_failure_in_stage_2_is_on_stage_2s_span(traced: tuple[list[StageProcess], StageProcess, Path]) -> None:
    stages, _, traces = traced
    rid = f"req-{uuid.uuid4()}"
    r = post(stages[0], np.full((1, 16), 1e9, np.float32), {"x-request-id": rid})
    assert r.status_code == 502, r.text
    assert "tiny-stage-2" in r.json()["error"]
    spans = spans_of(traces, rid, 11)  # no encode span where it failed: 4 + 4 + 3
    assert len({s["trace_id"] for s in spans}) == 1

    # where it failed: stage 2's inference span and its server span, 500 with the exception recorded
    inference = one(spans, "tiny-stage-2", "inference")
    server2 = one(spans, "tiny-stage-2", SERVER)
    for span in (inference, server2):
        assert span["status"]["code"] == "ERROR"
        assert "inference failed in tiny-stage-2" in span["status"]["message"]
        events = [e for e in span["events"] if e["name"] == "exception"]
        assert events and events[0]["attributes"]["exception.type"].endswith("InferenceFailed")
    assert server2["attributes"]["http.response.status_code"] == 500
    assert one(spans, "tiny-stage-2", "decode")["status"]["code"] == "UNSET"
    assert not [s for s in spans if s["service"] == "tiny-stage-2" and s["name"] == "encode"]

    # upstream: stage 1's forward span got the 500 and names stage 2; both servers answered 502
    forward1 = one(spans, "tiny-stage-1", "forward")
    assert forward1["status"]["code"] == "ERROR"
    assert forward1["attributes"]["http.response.status_code"] == 500
    assert "next stage tiny-stage-2" in forward1["status"]["message"]
    for stage in ("tiny-stage-0", "tiny-stage-1"):
        server = one(spans, stage, SERVER)
        assert server["status"]["code"] == "ERROR"
        assert server["attributes"]["http.response.status_code"] == 502
        assert one(spans, stage, "inference")["status"]["code"] == "UNSET"  # their own work went fine


def test_bad_input_is_an_error_on_stage_0s_span(traced: tuple[list[StageProcess], StageProcess, Path]) -> None:
    stages, _, traces = traced
    rid = f"req-{uuid.uuid4()}"
    r = post(stages[0], np.ones((1, 15), np.float32), {"x-request-id": rid})
    assert r.status_code == 400
    spans = spans_of(traces, rid, 3)
    assert {s["service"] for s in spans} == {"tiny-stage-0"}  # nothing was forwarded
    server = one(spans, "tiny-stage-0", SERVER)
    assert server["status"]["code"] == "ERROR" and server["attributes"]["http.response.status_code"] == 400
    assert r.json()["error"] == server["status"]["message"]
    assert [e["name"] for e in server["events"]] == ["exception"]
    assert one(spans, "tiny-stage-0", "inference")["status"]["code"] == "ERROR"


# ------------------------------------------------------------------------------- set-up from the environment


def test_no_exporter_configured_means_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "STAGE_TRACE_FILE", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    tracing = StageTracing.from_env(pipeline="p", stage="s", version="v1", index=0)
    assert not tracing.enabled and tracing.provider is None
    with tracing.server("/r", "POST", "/r", {}) as span, tracing.span("decode") as child:
        assert span is None and child is None
    with tracing.forward("http://x", "n") as hop:  # off: the caller's headers go on unchanged
        assert hop.headers({"traceparent": "t", "b3": "b"}) == {"traceparent": "t", "b3": "b"}


def test_exporters_from_otel_variables(tmp_path: Path) -> None:
    assert build_processors({}) == []
    assert len(build_processors({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})) == 1  # otlp implied
    assert len(build_processors({"OTEL_TRACES_EXPORTER": "otlp,console"})) == 2
    assert build_processors({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert len(build_processors({}, "st", "v1", str(tmp_path / "{stage}.jsonl"))) == 1
    assert (tmp_path / "st.jsonl").exists()
    assert build_processors({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
                            trace_file=str(tmp_path / "x.jsonl")) == []
    with pytest.raises(StartupError, match="OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"):
        build_processors({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(StartupError, match="OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported"):
        build_processors({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(StartupError, match="STAGE_TRACE_FILE: cannot open"):
        build_processors({}, trace_file=str(tmp_path / "st.jsonl" / "under-a-file.jsonl"))


def test_service_name_defaults_to_the_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trace_file = str(tmp_path / "t.jsonl")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    tracing = StageTracing.from_env(pipeline="p", stage="p-stage-1", version="v2", index=1, trace_file=trace_file)
    assert tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "p-stage-1"
    assert tracing.provider.resource.attributes["service.version"] == "v2"
    tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    tracing = StageTracing.from_env(pipeline="p", stage="p-stage-1", version="v2", index=1, trace_file=trace_file)
    assert tracing.provider is not None and tracing.provider.resource.attributes["service.name"] == "custom"
    tracing.shutdown()


def test_forward_headers_carry_the_client_span_in_both_formats() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = StageTracing(provider, {"meshpipe.stage": "s"})
    incoming = {"x-request-id": "r", "x-pipeline-t": "1", "b3": "stale", "x-b3-flags": "1", "tracestate": "a=b"}
    with tracing.server("/r", "POST", "/r", incoming), tracing.forward("http://next", "n") as hop:
        out = hop.headers(incoming)
    client = next(s for s in exporter.get_finished_spans() if s.name == "forward")
    assert client.context is not None
    trace_id, span_id = f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}"
    flags = int(out.pop("traceparent").removeprefix(f"00-{trace_id}-{span_id}-"), 16)
    assert flags & 1  # sampled (0x02 is W3C level 2's "random trace id")
    assert out == {"x-request-id": "r", "x-pipeline-t": "1", "x-b3-traceid": trace_id, "x-b3-spanid": span_id,
                   "x-b3-sampled": "1"}


@pytest.mark.parametrize(("propagators", "winner"), [(None, "w3c"), ("tracecontext,b3multi", "b3")])
def test_where_w3c_and_b3_disagree_the_last_propagator_wins(propagators: str | None, winner: str) -> None:
    """By default W3C (what Envoy's OpenTelemetry tracer rewrites); OTEL_PROPAGATORS reorders."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    env = {"OTEL_PROPAGATORS": propagators} if propagators else {}
    tracing = StageTracing(provider, {}, build_propagator(env))
    w3c = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    b3 = ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1")
    incoming = {"traceparent": f"00-{w3c[0]}-{w3c[1]}-01", "x-b3-traceid": b3[0], "x-b3-spanid": b3[1],
                "x-b3-sampled": "1"}
    with tracing.server("/r", "POST", "/r", incoming):
        pass
    server = exporter.get_finished_spans()[0]
    assert server.parent is not None
    expected = w3c if winner == "w3c" else b3
    assert (f"{server.parent.trace_id:032x}", f"{server.parent.span_id:016x}") == expected


def test_propagators_from_otel_propagators() -> None:
    assert len(build_propagator({})._propagators) == 2
    with pytest.raises(StartupError, match="OTEL_PROPAGATORS: unknown propagator"):
        build_propagator({"OTEL_PROPAGATORS": "tracecontext,xray"})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = StageTracing(provider, {}, build_propagator({"OTEL_PROPAGATORS": "b3"}))
    with tracing.server("/r", "POST", "/r", {}), tracing.forward("http://next", "n") as hop:
        out = hop.headers({})
    assert list(out) == ["b3"]  # the single-header B3 format only
