"""bench-split's pieces on the tiny dense chain, so `make bench-split` cannot rot unseen."""

from __future__ import annotations

from pathlib import Path

from benchmarks.split import markdown, run
from tests.tiny import write_tiny_pipeline


def test_bench_split_compares_split_with_the_exhaustive_best_by_compute_and_by_its_own_objective(
        tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path, widths=(16, 32, 24, 12, 4))
    report = run(tmp_path / "model.onnx", [2, 3], threads=1, runs=1, repeat=2)
    assert [r["stages"] for r in report["results"]] == [2, 3]
    for r in report["results"]:
        assert len(r["chosen_cuts"]) == r["stages"] - 1 and len(r["repeated_choices"]) == 2
        # nothing beats the exhaustive search on what it searched: compute alone, and compute with transfer
        assert r["bottleneck_ms"] >= r["exhaustive_best_ms"] > 0
        assert r["counted_bottleneck_ms"] >= r["counted_best_ms"] > 0
        assert r["counted_ratio"] == r["counted_bottleneck_ms"] / r["counted_best_ms"]
    text = markdown(report)
    assert "transfer counted: chosen / best ms (ratio)" in text and text.count("\n| ") == 3
    assert f"{report['per_mb_ms']} ms per MB" in text
