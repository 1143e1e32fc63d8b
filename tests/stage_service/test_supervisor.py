"""The process supervisor on real processes: /proc identities, group stops, the readiness wait's three outcomes."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from stage_service.launch import HOST, free_port
from stage_service.supervisor import (
    Child,
    NotReady,
    ProcessExited,
    ProcessId,
    http_ready,
    process_tree,
    start_time,
    stop_processes,
    wait_gone,
    wait_ready,
)

# A parent that starts a grandchild, writes its pid to the log, and sleeps.
PARENT = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
          " print('grandchild', g.pid, flush=True); time.sleep(60)")


def _grandchild(child: Child) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        words = child.log().split()
        if len(words) == 2:
            return int(words[1])
        time.sleep(0.05)
    raise AssertionError(f"no grandchild reported:\n{child.log()}")


def test_a_group_stop_reaches_the_grandchild_and_a_recycled_pid_is_never_ours(tmp_path: Path) -> None:
    child = Child.start("parent", [sys.executable, "-c", PARENT], tmp_path / "parent.log", new_session=True)
    grandchild = _grandchild(child)
    assert process_tree(child.pid)[0] == child.pid and grandchild in process_tree(child.pid)
    assert ProcessId.of(child.pid) == child.id and start_time(child.pid) == child.start_ticks
    impostor = ProcessId(child.pid, child.start_ticks + 1)  # same pid, another start time: not ours
    assert not impostor.running()
    impostor.signal(signal.SIGKILL, group=True)
    assert child.alive()

    grand = ProcessId.of(grandchild)
    assert grand is not None and grand.running()
    assert stop_processes([child.id], grace_s=10, group=True) == []
    assert wait_gone([grand], 10) == []
    assert child.proc.wait(10) == -signal.SIGTERM and not grand.running()


def test_stop_returns_the_exit_code_and_kills_what_ignores_the_signal(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"
    child = Child.start("stubborn", [sys.executable, "-c", stubborn], tmp_path / "stubborn.log")
    wait_ready([child.target(lambda: "up" in child.log())], timeout=20)
    assert child.stop(signal.SIGTERM, timeout=0.5) == -signal.SIGKILL
    quick = Child.start("quick", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "quick.log")
    quick.proc.wait(20)
    assert quick.stop() == 3  # already exited: no signal, its own code


def test_wait_ready_fails_at_once_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    code = "import sys; print('bad setting: STAGE_X', flush=True); sys.exit(2)"
    child = Child.start("broken", [sys.executable, "-c", code], tmp_path / "broken.log")
    started = time.monotonic()
    with pytest.raises(ProcessExited, match=r"broken exited with 2 during start-up:\nbad setting: STAGE_X"):
        wait_ready([child.target(lambda: False)], timeout=60)
    assert time.monotonic() - started < 30


def test_wait_ready_names_what_is_not_ready_at_the_deadline(tmp_path: Path) -> None:
    sleeper = Child.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    try:
        probe = http_ready("http://127.0.0.1:9/never")  # nothing listens on port 9: an httpx error, not ready
        with pytest.raises(NotReady, match=r"sleeper not ready within 0.5 s") as raised:
            wait_ready([sleeper.target(probe)], timeout=0.5)
        assert raised.value.names == ["sleeper"] and isinstance(raised.value, TimeoutError)
    finally:
        assert sleeper.stop(signal.SIGKILL) == -signal.SIGKILL


def test_wait_ready_returns_once_every_target_answers(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    servers = [Child.start(f"http-{port}", [sys.executable, "-m", "http.server", "--bind", HOST, str(port)],
                           tmp_path / f"http-{port}.log", cwd=tmp_path) for port in ports]
    try:
        urls = [f"http://{HOST}:{port}/" for port in ports]
        waited = wait_ready([s.target(http_ready(url)) for s, url in zip(servers, urls, strict=True)], timeout=30)
        assert waited >= 0 and all(httpx.get(url).status_code == 200 for url in urls)
    finally:
        assert [s.stop() for s in servers] == [-signal.SIGTERM] * 2
