"""`python -m benchmarks.reliability` (`make reliability`), run short: every section written, counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.reliability import CLASSES, RAW_CLASS, main


def test_short_reliability_run_writes_fuzz_and_fault_sections(tmp_path: Path) -> None:
    markdown = tmp_path / "RELIABILITY.md"
    out = tmp_path / "out"
    assert main(["--examples", "8", "--rate", "5", "--steady", "1", "--fault", "2", "--target-freeze", "1",
                 "--faults", "sigterm,freeze-target", "--out", str(out), "--markdown", str(markdown)]) == 0
    result = json.loads((out / "reliability.json").read_text())
    for target in ("stage app", "gateway"):
        assert sorted(result["statuses"][target]) == sorted(CLASSES)
        for counts in result["statuses"][target].values():
            assert sum(counts.values()) == 8
            assert not [s for s in counts if s.startswith("5") and s != "503"], counts
    for name, counts in result["statuses"]["gateway"].items():
        if name != RAW_CLASS:  # the raw bytes carry no token: framing is what they test
            assert "401" not in counts and "403" not in counts, (name, counts)  # the fuzz passes the token check
    assert result["crashed"] == []
    assert {n for n in result["peak_rss_mb"] if not n.endswith("sidecar")} >= {"tiny-stage-0-v1-0", "gateway"}
    assert [(f["name"], [p["sent"] for p in f["phases"]]) for f in result["faults"]] == [
        ("sigterm", [5, 10, 5]), ("freeze-target", [5, 5, 5])]
    assert all(p["failed"] == 0 for f in result["faults"] for p in f["phases"])
    text = markdown.read_text()
    assert "raw bytes" in text and "load average" in text
    assert text.count("| during |") == 2


def test_an_unknown_fault_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--faults", "sigkill,melt"])
    assert "unknown fault melt" in capsys.readouterr().err
