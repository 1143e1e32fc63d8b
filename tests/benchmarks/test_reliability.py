"""`python -m benchmarks.reliability` (`make reliability`), run short: every section written, counts add up."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.reliability import CLASSES, main


def test_short_reliability_run_writes_fuzz_and_fault_sections(tmp_path: Path) -> None:
    markdown = tmp_path / "RELIABILITY.md"
    out = tmp_path / "out"
    assert main(["--examples", "10", "--rate", "5", "--phase", "1", "--out", str(out),
                 "--markdown", str(markdown)]) == 0
    fuzz = json.loads((out / "fuzz.json").read_text())
    for target in ("stage app", "gateway"):
        assert sorted(fuzz["statuses"][target]) == sorted(CLASSES)
        for counts in fuzz["statuses"][target].values():
            assert sum(counts.values()) == 10
            assert not [s for s in counts if s.startswith("5") and s != "503"], counts
    assert fuzz["crashed"] == [] and len(fuzz["peak_rss_mb"]) == 3
    text = markdown.read_text()
    for section in ("fuzz", "sigkill", "sigterm", "freeze"):
        assert f"<!-- {section}:start -->" in text, section
    assert text.count("| during | 5 |") == 3  # 5 requests/s for 1 s in each fault's window
    assert f"--pipeline {out / 'tiny'}" in text
