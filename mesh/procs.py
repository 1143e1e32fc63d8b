"""A small process manager: start detached processes with a log file each, tell if they live, stop them.

Each process starts in its own session (so a terminal's Ctrl-C reaches only `mesh up`, which then tears
down in order, and so it outlives `mesh up --detach`). A record keeps the pid and the kernel's start time
of that pid, so a recycled pid is never mistaken for ours, and never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class Proc(BaseModel):
    """One started process."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: str  # "app", "sidecar" or "gateway"
    stage: str | None
    pid: int
    start_ticks: int
    log: str
    cmd: list[str]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat, None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; the fields after it are plain.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    """Collect a child's exit status, when we are its parent, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start(name: str, role: str, stage: str | None, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=cwd, start_new_session=True)
    stat = _stat(popen.pid)
    # A process that died at once still has its zombie (we are its parent), so the stat is there.
    ticks = stat[1] if stat else 0
    # Popen's own bookkeeping is dropped: these processes outlive this one and are tracked by pid.
    popen.returncode = 0
    return Proc(name=name, role=role, stage=stage, pid=popen.pid, start_ticks=ticks, log=str(log), cmd=cmd)


def alive(proc: Proc) -> bool:
    _reap(proc.pid)
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start_ticks and stat[0] not in ("Z", "X")


def signal_group(proc: Proc, sig: int) -> None:
    """Signal the process and anything it started (its session's process group), only if it is still ours."""
    if alive(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def stop(procs: list[Proc], grace_s: float = 10.0) -> list[Proc]:
    """SIGTERM every live process, SIGKILL what is left after `grace_s`; return those that would not die."""
    for p in procs:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.05)
    for p in procs:
        signal_group(p, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.05)
    return [p for p in procs if alive(p)]


def marked(variable: str, value: str) -> list[int]:
    """Pids of live processes whose environment holds `variable=value` (what we started, and their children)."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone, or another user's
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def tail(path: Path | str, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
