"""The benchmark suite's own pieces, run small on the tiny pipeline so `make bench` cannot rot unseen."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from benchmarks.floor_stage import floor_chain
from benchmarks.sections import update_section
from benchmarks.suite import interleaved_ms, latency_section, markdown, paused_chain_ms, sequential_ms, threaded_rps
from model_export.manifest import Manifest
from model_export.verify import Chain, pipeline_inputs
from stage_service import protocol


def test_sections_of_benchmarks_md_are_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    update_section(path, "a", "## A\n\none")
    update_section(path, "b", "## B\n\ntwo")
    update_section(path, "a", "## A\n\nthree")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "one" not in text and text.index("three") < text.index("two")
    assert text.count("<!-- a:start -->") == 1 and text.count("<!-- b:end -->") == 1


def test_in_process_measures_latency_and_throughput() -> None:
    calls = []
    lat = sequential_ms(lambda: calls.append(1), seconds=0.2)
    assert len(lat) == len(calls) > 3 and all(ms >= 0 for ms in lat)
    assert threaded_rps(lambda: calls.append(1), seconds=0.2, threads=2) > 0 and len(calls) > len(lat)


def test_setups_take_turns_in_windows_each_round_led_by_the_next() -> None:
    turns: list[tuple[str, float]] = []

    def window(name: str):  # noqa: ANN202
        return lambda seconds: turns.append((name, seconds)) or [float(len(turns))]

    lat = interleaved_ms({name: window(name) for name in "abc"}, seconds=3.0, rounds=4)
    assert [name for name, _ in turns] == list("abc" "bca" "cab" "abc")
    assert {seconds for _, seconds in turns} == {0.75}
    assert lat == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_latency_section_runs_every_setup_on_a_real_chain_and_mesh(tiny_pipeline: tuple[Path, Manifest]) -> None:
    directory, manifest = tiny_pipeline
    rows = latency_section(directory, seconds=0.5)
    assert [r["setup"].split(",")[0].split(" (")[0] for r in rows] == [
        "whole model", "3 stages chained in-process", "3 stage processes chained on loopback",
        "3 stages through the Envoy mesh", "3 stages chained in-process", "3 floor stage processes chained on loopback"]
    assert [bool(r.get("reference")) for r in rows] == [False] * 4 + [True] * 2
    for row in rows:
        assert row["p50_ms"] > 0 and row["requests"] > 0
        assert row.get("reference") or row["throughput_rps"] > 0
    assert "per_hop_overhead_ms" in rows[3]
    text = markdown({"machine": "m", "date": "d", "latency": rows, "failed": {}})
    assert "Envoy mesh overhead over direct chaining" in text and text.count("\n| ") == 11
    assert "Where the loopback chain's extra time goes" in text and "idle (not counted)" in text


def test_the_paused_chain_counts_the_stages_and_not_the_pauses(tiny_pipeline: tuple[Path, Manifest]) -> None:
    directory, manifest = tiny_pipeline
    chain, feeds = Chain(directory, manifest, threads=1), pipeline_inputs(manifest, 1, 0)
    chain.run(feeds)  # onnxruntime's first runs are slower
    lat = paused_chain_ms(chain, feeds, pause_s=0.05, seconds=0.5)
    # 3 pauses of 50 ms a run: at most 4 runs fit in 0.5 s, and what is counted is the tiny stages' microseconds
    assert 1 <= len(lat) <= 4 and max(lat) < 50


def test_a_floor_chain_answers_what_the_chain_computes(tiny_pipeline: tuple[Path, Manifest], tmp_path: Path) -> None:
    directory, manifest = tiny_pipeline
    feeds = pipeline_inputs(manifest, 2, 0)
    body, header_length = protocol.encode_request(feeds)
    with floor_chain(directory, tmp_path) as url:
        meta = httpx.get(f"{url}/v2/models/{manifest.name}", timeout=10).json()
        response = httpx.post(f"{url}/v2/models/{manifest.name}/infer", content=body, timeout=30,
                              headers={protocol.HEADER_LENGTH: str(header_length),
                                       "content-type": protocol.BINARY_CONTENT_TYPE})
    assert [t["name"] for t in meta["inputs"]] == [t.name for t in manifest.inputs]
    assert response.status_code == 200
    assert response.headers["x-stage-timing"].count("floor=") == len(manifest.stages)
    _, outputs = protocol.decode_response(response.content, response.headers[protocol.HEADER_LENGTH])
    for name, want in Chain(directory, manifest, threads=1).run(feeds).items():
        np.testing.assert_array_equal(outputs[name], want)
