"""Stage processes for tests: the launch helpers of `stage_service.launch`, plus the test-only proxy."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from stage_service.launch import (
    HOST,
    StageProcess,
    free_port,
    launch,
    stage_command,
    stage_env,
    start_chain,
    start_stage,
    stop_all,
    wait_ready,
)

__all__ = ["HOST", "StageProcess", "free_port", "launch", "stage_command", "stage_env", "start_chain",
           "start_stage", "start_fake_stage", "stop_all", "wait_ready"]


def start_fake_stage(target: str, *, log_dir: Path | None = None, timeout: float = 30.0) -> StageProcess:
    """The test proxy of `fake_stage.py` in front of `target`, on a free port, answering."""
    port = free_port()
    directory = log_dir or Path(tempfile.mkdtemp(prefix="stage-logs-"))
    log_path = directory / f"fake-{port}.log"
    root = Path(__file__).resolve().parents[2]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stage_service.fake_stage", "--port", str(port), "--target", target],
            cwd=root, stdout=log, stderr=subprocess.STDOUT,
        )
    fake = StageProcess(name="fake", port=port, proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not fake.alive():
            raise RuntimeError(f"fake stage exited with {proc.returncode}:\n{fake.log()}")
        try:
            if httpx.get(f"{fake.url}/_fake/held", timeout=1.0).status_code == 200:
                return fake
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    fake.stop(signal.SIGKILL)
    raise TimeoutError(f"fake stage not up within {timeout} s:\n{fake.log()}")
