"""The local mesh's keeper: what kubelet is to a pod's containers, for the mesh's processes.

`mesh up` starts it last, as one more process of the mesh (role `keeper`, `python -m mesh.keeper STATE_DIR`).
It watches every other process the state file records; one that exited (crashed, killed, out of memory) is
started again as it was (`procs.restart`: its command, its own environment, its log, appended to), at once the
first time and then after a back-off that doubles from 1 s to 30 s while it keeps exiting, as kubelet's
CrashLoopBackOff does; 60 s of running clear it. A start happens under the mesh's `state_lock`, so nothing
`down` or a rollout stops on purpose is started again (they hold the lock until the state no longer lists it).
It ends when the state file no longer lists it: after `down`, or a new mesh in the same directory.

An Envoy it started again is watched until it is ready: one that runs without a listener of its configuration
(its port was taken while it was down, and Envoy rejects what it cannot bind but runs on) is stopped, so it
counts as one more exit and is started again after the back-off, until the port is free.

`mesh up --no-restart` starts no keeper: what dies stays dead, as with `restartPolicy: Never`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from mesh import local, procs

POLL_S = 0.5
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STEADY_S = 60.0  # running this long since its latest start: the next exit is restarted at once again


def backoff_s(exits_in_a_row: int) -> float:
    """How long after the `exits_in_a_row`-th exit in a row (1: the first) a process is started again."""
    if exits_in_a_row <= 1:
        return 0.0
    return min(FIRST_BACKOFF_S * 2 ** (exits_in_a_row - 2), MAX_BACKOFF_S)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _say(text: str) -> None:
    print(f"{_now()} {text}", flush=True)


class Keeper:
    """The keeper's memory between readings: when each process was first seen gone, and its exits in a row."""

    def __init__(self, state_dir: Path, pid: int) -> None:
        self.state_dir, self.pid = state_dir, pid
        self.gone_since: dict[str, float] = {}
        self.exits: dict[str, int] = {}
        self.unproven: set[str] = set()  # Envoys started again, not yet seen ready
        self.noted: set[str] = set()  # processes whose note (why they were stopped) is to be cleared: seen ready

    def listed(self, state: local.State | None) -> bool:
        return state is not None and any(p.role == local.KEEPER and p.pid == self.pid for p in state.procs)

    def due(self, state: local.State) -> list[procs.Proc]:
        """The processes gone long enough to be started again now. Forgets what the state no longer lists (a
        replica a rollout removed), and the exits in a row of what has run steadily."""
        listed = {p.name for p in state.procs}
        for memory in (self.gone_since, self.exits):
            for name in [n for n in memory if n not in listed]:
                del memory[name]
        self.unproven &= listed
        now, due = time.monotonic(), []
        for p in state.procs:
            if p.role == local.KEEPER:
                continue
            if procs.alive(p):
                if time.time() - p.started_at >= STEADY_S:
                    self.exits.pop(p.name, None)
                continue
            first = self.gone_since.setdefault(p.name, now)
            if now - first >= backoff_s(self.exits.get(p.name, 0) + 1):
                due.append(p)
        return due

    def restart(self, names: set[str]) -> bool:
        """Start `names` again under the lock, if the state still lists them gone; False: the mesh is gone.
        Without the lock (a command is changing the mesh) nothing is done: what it stops on purpose it removes
        from the state before it lets go, and is then forgotten (`due`)."""
        with local.state_lock(self.state_dir, wait=False) as held:
            if not held:
                return True
            state = local.read_state(self.state_dir)
            if not self.listed(state):
                return False
            assert state is not None
            for i, p in enumerate(state.procs):
                if p.name in names and not procs.alive(p):
                    state.procs[i] = self._start_again(p)
            local.write_state(self.state_dir, state)
        return True

    def broken(self, state: local.State) -> dict[str, str]:
        """The Envoys started again that run but cannot become ready, with why; forgets those seen ready."""
        out = {}
        for p in state.procs:
            if p.name not in self.unproven or not procs.alive(p):
                continue
            ready, fault = local.readiness(state, p)
            if ready:
                self.unproven.discard(p.name)
                if p.note:
                    self.noted.add(p.name)
            elif fault is not None:
                out[p.name] = fault
        return out

    @contextmanager
    def _changing_state(self) -> Iterator[local.State | None]:
        """The state under the mesh's lock, written back after the block; None, and nothing to do this reading,
        where a command holds the lock or no mesh is left."""
        with local.state_lock(self.state_dir, wait=False) as held:
            state = local.read_state(self.state_dir) if held else None
            yield state
            if state is not None:
                local.write_state(self.state_dir, state)

    def stop_broken(self, faults: dict[str, str]) -> None:
        """Stop the Envoys of `faults` under the lock (as a crash: the back-off then grows), if still listed."""
        with self._changing_state() as state:
            if state is None:
                return
            for i, p in enumerate(state.procs):
                if p.name in faults and procs.alive(p):
                    procs.stop([p], grace_s=5.0)
                    self.unproven.discard(p.name)
                    said = f"{faults[p.name]}; stopped it (pid {p.pid}), to start it again after the back-off"
                    _say(said)
                    state.procs[i] = p.model_copy(update={"note": f"{_now()} {said}"})

    def clear_notes(self) -> None:
        """Forget why the processes seen ready again were stopped (under the lock; next time if it is held)."""
        with self._changing_state() as state:
            if state is None:
                return
            state.procs = [p.model_copy(update={"note": ""}) if p.name in self.noted else p for p in state.procs]
            self.noted.clear()

    def _start_again(self, p: procs.Proc) -> procs.Proc:
        """`p` started again, or `p` as it was where that failed (counted as one more exit: the back-off grows)."""
        self.gone_since.pop(p.name, None)
        exits = self.exits[p.name] = self.exits.get(p.name, 0) + 1
        try:
            again = procs.restart(p)
        except OSError as exc:  # its command or directory gone, a failed fork: try again after the back-off
            self.gone_since[p.name] = time.monotonic()
            _say(f"{p.name} (pid {p.pid}) exited (exits in a row: {exits}) and could not be started again: {exc}; "
                 f"next try in {backoff_s(exits + 1):g} s")
            return p
        if p.role in ("sidecar", local.GATEWAY):
            self.unproven.add(p.name)
        _say(f"{p.name} (pid {p.pid}) exited (exits in a row: {exits}); started again: pid {again.pid} "
             f"(restart {again.restarts}); if it exits again, the next start waits {backoff_s(exits + 1):g} s")
        return again

    def run(self) -> int:
        while True:
            try:
                state = local.read_state(self.state_dir)
                if not self.listed(state):
                    _say("the mesh no longer lists this keeper: done")
                    return 0
                assert state is not None
                due = self.due(state)
                if due and not self.restart({p.name for p in due}):
                    return 0
                if self.unproven and (faults := self.broken(state)):
                    self.stop_broken(faults)
                if self.noted:
                    self.clear_notes()
            except local.MeshError as exc:  # an unreadable state file: said once a try, tried again
                _say(f"cannot read the mesh's state: {exc}")
            time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mesh.keeper STATE_DIR (started by `python -m mesh up`)", file=sys.stderr)
        return 2
    keeper = Keeper(Path(args[0]), os.getpid())
    try:
        listed = keeper.listed(local.read_state(keeper.state_dir))
    except local.MeshError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not listed:
        state = local.read_state(keeper.state_dir)
        running = local.running_keeper(state) if state else None
        if running is not None:
            print(f"the mesh in {args[0]} has its keeper already (pid {running.pid})", file=sys.stderr)
        else:
            print(f"no mesh in {args[0]} lists this keeper: `python -m mesh keep --state-dir {args[0]}` starts one "
                  "for a running mesh, `python -m mesh up` a mesh with one", file=sys.stderr)
        return 2
    _say(f"keeping the processes of the mesh in {args[0]}")
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
