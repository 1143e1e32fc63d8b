"""Start, watch and stop local processes, and wait until they answer ready: for the launcher, the local mesh,
the benchmarks and the tests alike.

- `Child.start` runs a command with its output in a log file; `send`, `stop` and `log` act on it.
- `ProcessId` names a process by pid and the kernel's start time of that pid, so a recycled pid is never
  mistaken for ours and never signalled (the mesh keeps these across commands; the benchmarks use them for
  process trees). `stop_processes` stops a set of them: a signal, a grace period, then SIGKILL.
- `wait_ready` is the one readiness wait: it polls each target's probe until all answer, and fails at once,
  with the process's log, when one exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat we use."""

    state: str  # R, S, D, Z (zombie), X (dead), ...
    ppid: int
    start_ticks: int  # clock ticks since boot


def proc_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    """/proc/<pid>/stat, None if there is no such pid."""
    try:
        raw = (proc / str(pid) / "stat").read_text()
        # The command name is in parentheses and may hold spaces: the fields after the last ')' are plain.
        fields = raw[raw.rindex(")") + 2:].split()
        return ProcStat(state=fields[0], ppid=int(fields[1]), start_ticks=int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, an identity that survives pid reuse)."""
    stat = proc_stat(pid, proc)
    return stat.start_ticks if stat else None


def process_tree(root: int, proc: Path = PROC) -> list[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        stat = proc_stat(int(entry.name), proc) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(stat.ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class ProcessId:
    """A process named by its pid and the start time of that pid."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process that has `pid` now; None if there is none."""
        ticks = start_time(pid)
        return None if ticks is None else cls(pid, ticks)

    def running(self) -> bool:
        """Still the same process, and not a zombie."""
        stat = proc_stat(self.pid)
        return stat is not None and stat.start_ticks == self.start_ticks and stat.state not in ("Z", "X")

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send `sig` to it (`group`: to its whole process group), only if it is still this process."""
        if self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)


def reap(pid: int) -> None:
    """Collect the exit status of a child that no Popen tracks any more, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_gone(ids: Sequence[ProcessId], timeout: float, interval: float = 0.05) -> list[ProcessId]:
    """Wait up to `timeout` seconds for every process to end; return those still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(i.running() for i in ids):
        time.sleep(interval)
    return [i for i in ids if i.running()]


def stop_processes(ids: Sequence[ProcessId], *, grace_s: float, group: bool = False,
                   sig: int = signal.SIGTERM) -> list[ProcessId]:
    """`sig` to every one still running, SIGKILL to what is left after `grace_s`; return those that would not die."""
    for i in ids:
        i.signal(sig, group=group)
    left = wait_gone(ids, grace_s)
    for i in left:
        i.signal(signal.SIGKILL, group=group)
    return wait_gone(left, 5.0)


@dataclass(kw_only=True)
class Child:
    """One process we started, with its output in `log_path`."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    start_ticks: int
    _sent: set[int] = field(default_factory=set, repr=False)

    @classmethod
    def start(cls, name: str, command: list[str], log_path: Path, *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, new_session: bool = False, append: bool = False, **fields: Any) -> Self:
        """Run `command` with stdout and stderr in `log_path`; do not wait. `new_session`: its own session and
        process group, so a terminal's Ctrl-C does not reach it and a group signal reaches what it starts."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab" if append else "wb") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None, cwd=cwd,
                                    start_new_session=new_session)
        # A process that died at once is still a zombie (we are its parent), so its stat is there.
        return cls(name=name, proc=proc, log_path=log_path, start_ticks=start_time(proc.pid) or 0, **fields)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def id(self) -> ProcessId:
        return ProcessId(self.proc.pid, self.start_ticks)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` once (a second SIGTERM during interpreter shutdown would kill it uncleanly)."""
        if self.proc.poll() is None and sig not in self._sent:
            self._sent.add(sig)
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait, kill if it hangs; return the exit code."""
        if self.proc.poll() is None:
            self.send(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def forget(self) -> ProcessId:
        """Drop Popen's bookkeeping of a process that outlives this one; from here on it is known by its id
        (and, while this process lives, `reap` collects its exit status)."""
        self.proc.returncode = 0
        return self.id

    def target(self, ready: Callable[[], bool]) -> Target:
        """What `wait_ready` polls for this process: `ready`, whether it runs, its log."""
        return Target(name=self.name, ready=ready, alive=self.alive, log=self.log, returncode=self.proc.poll)


@dataclass(frozen=True)
class Target:
    """One process to wait for: whether it answers ready, whether it still runs, and its log for errors."""

    name: str
    ready: Callable[[], bool]  # an httpx.HTTPError counts as "not yet"
    alive: Callable[[], bool]
    log: Callable[[], str]
    returncode: Callable[[], int | None] = lambda: None


class ProcessExited(RuntimeError):
    """A process exited before it answered ready."""

    def __init__(self, target: Target) -> None:
        code = target.returncode()
        status = f" with {code}" if code is not None else ""
        super().__init__(f"{target.name} exited{status} during start-up:\n{target.log()}")
        self.name = target.name


class NotReady(TimeoutError):
    """Processes still running but not ready at the deadline."""

    def __init__(self, pending: Sequence[Target], timeout: float) -> None:
        logs = "".join(f"\n--- {t.name}:\n{t.log()}" for t in pending)
        super().__init__(f"{', '.join(t.name for t in pending)} not ready within {timeout:g} s:{logs}")
        self.names = [t.name for t in pending]


def http_ready(*urls: str, timeout: float = 1.0, client: httpx.Client | None = None) -> Callable[[], bool]:
    """A probe: every URL answers GET with 200."""
    get = client.get if client is not None else httpx.get
    return lambda: all(get(url, timeout=timeout).status_code == 200 for url in urls)


def port_open(host: str, port: int) -> Callable[[], bool]:
    """A probe: something accepts TCP connections on host:port (a server that speaks no HTTP route to ask)."""
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    return check


def wait_ready(targets: Sequence[Target], timeout: float, interval: float = 0.05) -> float:
    """Poll every target until each has answered ready; return the seconds that took. Raise ProcessExited as
    soon as one exits (a target that answered ready must keep running too), NotReady at the deadline."""
    started = time.monotonic()
    pending = list(targets)
    while True:
        for target in targets:
            if not target.alive():
                raise ProcessExited(target)
        pending = [t for t in pending if not _answers(t)]
        if not pending:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise NotReady(pending, timeout)
        time.sleep(interval)


def _answers(target: Target) -> bool:
    try:
        return target.ready()
    except httpx.HTTPError:
        return False
