"""The local mesh's processes: started detached (by `stage_service.supervisor`), each recorded in the mesh's state.

Each process starts in its own session (so a terminal's Ctrl-C reaches only `mesh up`, which then tears
down in order, and so it outlives `mesh up --detach`). A record keeps the pid and the kernel's start time
of that pid, so a recycled pid is never mistaken for ours, and never signalled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from stage_service.supervisor import Child, ProcessId, proc_stat, reap, stop_processes


class Proc(BaseModel):
    """One started process."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: str  # "app", "sidecar", "gateway" or "keeper"
    stage: str | None
    pid: int
    start_ticks: int
    log: str
    cmd: list[str]
    # Its own environment: what it runs with besides the starting process's (STAGE_* of that left out), so the
    # keeper (mesh.keeper) starts it again the same way. No secret goes here: settings, paths and the marker.
    env: dict[str, str] = {}
    restarts: int = 0  # times the keeper started it again after it exited
    started_at: float = 0.0  # time.time() of its (latest) start
    cwd: str = ""  # the directory it started in (its command and settings may name paths relative to it)
    note: str = ""  # why the keeper last stopped it, until it is seen ready again (`status` shows it)


def _id(proc: Proc) -> ProcessId:
    return ProcessId(proc.pid, proc.start_ticks)


def inherited_env() -> dict[str, str]:
    """What a started process inherits of this one's environment: all but STAGE_* (a stage's settings come only
    from the mesh's plan, never from the shell that ran `mesh`)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STAGE_")}


def start(name: str, role: str, stage: str | None, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          restarts: int = 0, cwd: str | None = None) -> Proc:
    """Start `cmd` detached with `env` over the inherited environment, its output appended to `log`."""
    own, where = dict(env or {}), cwd or os.getcwd()
    started = Child.start(name, cmd, log, env={**inherited_env(), **own}, cwd=Path(where), new_session=True,
                          append=True).forget()
    return Proc(name=name, role=role, stage=stage, pid=started.pid, start_ticks=started.start_ticks, log=str(log),
                cmd=cmd, env=own, restarts=restarts, started_at=time.time(), cwd=where)


def restart(proc: Proc) -> Proc:
    """`proc` started again as it was (its command, own environment, directory and log), one restart more."""
    again = start(proc.name, proc.role, proc.stage, proc.cmd, Path(proc.log), proc.env, restarts=proc.restarts + 1,
                  cwd=proc.cwd or None)
    return again.model_copy(update={"note": proc.note})


def alive(proc: Proc) -> bool:
    """Still the process we started (not a recycled pid) and not a zombie."""
    reap(proc.pid)
    return _id(proc).running()


def stop(procs: list[Proc], grace_s: float = 10.0) -> list[Proc]:
    """SIGTERM every live process's group, SIGKILL what is left after `grace_s`; return those that would not die."""
    left = stop_processes([_id(p) for p in procs], grace_s=grace_s, group=True)
    for p in procs:
        reap(p.pid)
    return [p for p in procs if _id(p) in left]


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
        stat = proc_stat(int(entry.name))
        if stat is not None and stat.state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def tail(path: Path | str, lines: int = 20, critical_first: bool = False) -> str:
    """The last `lines` lines of a log; with `critical_first`, after its first `[critical]` line where the tail
    lacks it: Envoy says why it aborts there (e.g. no inotify instance left), and its backtrace fills the tail."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    every = text.splitlines()
    last = every[-lines:] if lines > 0 else []
    first = next((line for line in every if "[critical]" in line), None)
    if critical_first and first is not None and first not in last:
        last = [first, "...", *last]
    return "\n".join(last)
