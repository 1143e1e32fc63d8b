"""Stage processes for tests: the launch helpers of `stage_service.launch`, plus the test-only proxy."""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

from stage_service.launch import (
    HOST,
    StageProcess,
    free_port,
    stage_command,
    stage_env,
    start_chain,
    start_stage,
    stop_all,
)
from stage_service.supervisor import http_ready, wait_ready

__all__ = ["HOST", "StageProcess", "free_port", "stage_command", "stage_env", "start_chain", "start_stage",
           "start_fake_stage", "stop_all"]


def start_fake_stage(target: str, *, log_dir: Path | None = None, timeout: float = 30.0) -> StageProcess:
    """The test proxy of `fake_stage.py` in front of `target`, on a free port, answering."""
    port = free_port()
    directory = log_dir or Path(tempfile.mkdtemp(prefix="stage-logs-"))
    fake = StageProcess.start(
        "fake stage", [sys.executable, "-m", "tests.stage_service.fake_stage", "--port", str(port), "--target", target],
        directory / f"fake-{port}.log", cwd=Path(__file__).resolve().parents[2], port=port,
    )
    try:
        wait_ready([fake.target(http_ready(f"{fake.url}/_fake/held"))], timeout)
    except BaseException:
        fake.stop(signal.SIGKILL)
        raise
    return fake
