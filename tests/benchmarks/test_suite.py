"""The benchmark suite's own pieces, run small on the tiny pipeline so `make bench` cannot rot unseen."""

from __future__ import annotations

from pathlib import Path

from benchmarks.sections import update_section
from benchmarks.suite import in_process, latency_section, markdown
from model_export.manifest import Manifest


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
    result = in_process(lambda: calls.append(1), seconds=0.2, threads=2)
    assert set(result) == {"p50_ms", "p99_ms", "throughput_rps"}
    assert result["throughput_rps"] > 0 and result["p50_ms"] <= result["p99_ms"] and len(calls) > 3


def test_latency_section_runs_every_setup_on_a_real_chain_and_mesh(tiny_pipeline: tuple[Path, Manifest]) -> None:
    directory, manifest = tiny_pipeline
    rows = latency_section(directory, seconds=0.5)
    assert [r["setup"].split(",")[0].split(" (")[0] for r in rows] == [
        "whole model", "3 stages chained in-process", "3 stage processes chained on loopback",
        "3 stages through the Envoy mesh"]
    for row in rows:
        assert row["p50_ms"] > 0 and row["throughput_rps"] > 0
        assert not row.get("errors"), row
    assert "per_hop_overhead_ms" in rows[-1]
    text = markdown({"machine": "m", "date": "d", "latency": rows, "failed": {}})
    assert "Envoy mesh overhead over direct chaining" in text and text.count("\n| ") >= 5
