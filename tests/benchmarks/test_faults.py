"""`python -m benchmarks.faults`: a short freeze through a real local mesh writes its figures, never a verdict."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.faults import main
from model_export.tiny import write_tiny_pipeline


def test_freeze_benchmark_writes_json_and_its_section(tmp_path: Path) -> None:
    pipeline = tmp_path / "bench"
    write_tiny_pipeline(pipeline, name="bench")
    markdown = tmp_path / "RELIABILITY.md"
    markdown.write_text("# Reliability\n\nkept\n")
    args = ["--pipeline", str(pipeline), "--stage", "bench-stage-1", "--rate", "5", "--before", "1",
            "--freeze", "1", "--after", "1", "--out", str(tmp_path / "out"), "--markdown", str(markdown)]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "freeze.json").read_text())
    assert [(p["phase"], p["sent"]) for p in result["phases"]] == [("before", 5), ("during", 5), ("after", 5)]
    text = markdown.read_text()
    assert "kept" in text and "<!-- freeze:start -->" in text and "| during | 5 |" in text
    assert main([args[0], str(tmp_path / "nowhere"), *args[2:]]) == 2  # one line naming it, no traceback
