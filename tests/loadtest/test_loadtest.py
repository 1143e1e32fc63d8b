"""The load generator against a real 3-stage chain on loopback, and its open-loop timing semantics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from loadtest import report
from loadtest.runner import LoadSettings, closed_loop, open_loop
from loadtest.workload import Body, Workload
from model_export.manifest import Manifest
from tests.stage_service.procs import StageProcess, free_port, start_chain, stop_all
from tests.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def chain(tiny_pipeline: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageProcess]:
    directory, _ = tiny_pipeline
    stages = start_chain(directory / "pipeline.json", log_dir=tmp_path_factory.mktemp("lt-logs"))
    yield stages[0]
    stop_all(stages)


def loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    # Wide: at 80 columns the table leaves out p90 and p99.9 (test_table_fits_80_columns)
    return subprocess.run([sys.executable, "-m", "loadtest", "run", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_open_loop_with_every_response_checked(chain: StageProcess, tiny_pipeline: tuple[Path, Manifest],
                                                tmp_path: Path) -> None:
    directory, _ = tiny_pipeline
    r = loadtest("--url", chain.url, "--model", "tiny", "--rate", "40", "--duration", "2", "--pipeline",
                 str(directory), "--check-fraction", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = summary["runs"][0]
    assert run["requests"] == 80 and run["ok"] == 80 and run["errors"] == {}
    assert run["checked"] == 80 and run["max_abs_diff"] <= 1e-5
    assert set(run["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean", "max"}
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    assert "p99.9 ms" in r.stdout
    assert (tmp_path / "latency-rate-40s.png").read_bytes()[:4] == b"\x89PNG"
    samples = json.loads((tmp_path / "samples.json").read_text())["rate 40/s"]
    assert [s["intended_s"] for s in samples] == pytest.approx([i / 40 for i in range(80)])


def test_closed_loop_sweep_and_json_encoding(chain: StageProcess, tmp_path: Path) -> None:
    r = loadtest("--url", chain.url, "--model", "tiny", "--concurrency", "1,3", "--duration", "1", "--json",
                 "--max-requests", "200", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["encoding"] == "json"
    assert [run["label"] for run in summary["runs"]] == ["concurrency 1", "concurrency 3"]
    assert all(0 < run["ok"] <= 200 and run["errors"] == {} for run in summary["runs"])
    assert (tmp_path / "sweep.png").exists()


def test_wrong_outputs_are_counted_and_fail_the_run(chain: StageProcess, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_tiny_pipeline(other, seed=42)  # same tensors, other weights: every checked answer is wrong
    r = loadtest("--url", chain.url, "--model", "tiny", "--rate", "20", "--duration", "1", "--pipeline",
                 str(other), "--check-fraction", "1", "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    run = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"][0]
    assert run["errors"] == {"wrong-output": 20}


def test_bad_targets_get_one_clear_message(chain: StageProcess) -> None:
    r = loadtest("--url", f"http://127.0.0.1:{free_port()}", "--model", "tiny", "--rate", "1", "--duration", "1")
    assert r.returncode == 2 and "cannot reach the server" in r.stderr
    r = loadtest("--url", chain.url, "--model", "nope", "--rate", "1", "--duration", "1")
    assert r.returncode == 2 and "HTTP 404" in r.stderr
    r = loadtest("--url", chain.url, "--model", "tiny", "--concurrency", "0", "--duration", "1")
    assert r.returncode == 2 and "between 1 and 1024" in r.stderr


def _stalling_transport(stall_s: float) -> httpx.MockTransport:
    """A server that answers one request at a time and stalls on the first one."""
    lock = asyncio.Lock()
    seen = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal seen
        async with lock:
            seen += 1
            if seen == 1:
                await asyncio.sleep(stall_s)
        return httpx.Response(200, content=b"{}")

    return httpx.MockTransport(handler)


def test_open_loop_latency_counts_from_the_intended_send_time() -> None:
    """No coordinated omission: every request scheduled during a stall carries the stall in its latency,
    where a closed-loop client would show it in one request only."""
    workload = Workload("http://target", "m", True, [Body(b"{}", {})])
    stall, rate = 0.6, 20.0
    settings = LoadSettings(rate=rate, duration_s=1.0)
    samples = asyncio.run(open_loop(workload, settings, None, _stalling_transport(stall)))
    assert len(samples) == 20 and all(s.status == "200" for s in samples)
    for s in samples:
        assert s.intended_s == pytest.approx(samples.index(s) / rate)
        if s.intended_s < stall:  # queued behind the stall: it cannot have finished before the stall ended
            assert s.latency_s >= stall - s.intended_s - 0.01
    closed = asyncio.run(closed_loop(workload, LoadSettings(concurrency=1, duration_s=1.0), None,
                                     _stalling_transport(stall)))
    # A closed loop sends nothing while its one request stalls: the stall lands in that request's latency
    # alone, because every later request was sent after it (lower bounds only, so a busy machine cannot flake it).
    assert closed[0].latency_s >= stall - 0.01
    assert len(closed) > 1 and all(s.intended_s >= stall - 0.01 for s in closed[1:])


def test_table_fits_80_columns() -> None:
    run = {"label": "concurrency 16", "requests": 12345, "ok": 12345, "throughput_rps": 123.4, "errors": {},
           "latency_ms": {"p50": 1234.5, "p90": 2345.6, "p99": 3456.7, "p99.9": 4567.8}, "checked": 617,
           "max_abs_diff": 1.5e-7}
    for width, dropped in ((200, []), (80, ["p90 ms", "p99.9 ms", "checked"])):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(report.table([run], "reference at http://127.0.0.1:8080 (binary, batch 1)", width))
        text = console.export_text()
        assert all(len(line) <= width for line in text.splitlines()), text
        assert "1234.50" in text and "3456.70" in text and "123.4" in text
        assert [c for c in ("p90 ms", "p99.9 ms", "checked") if c not in text] == dropped


def test_every_option_has_help_and_shows_its_default() -> None:
    from loadtest.__main__ import parser
    from tests.model_export.test_cli import options_without_help_or_default

    assert options_without_help_or_default(parser()) == []
