"""The local mesh's keeper (mesh.keeper) on a real mesh: a SIGKILLed app, sidecar and gateway are started again
and the pipeline answers again, with the restarts counted in `mesh status`; a process that keeps exiting waits
a back-off that grows; `down` stops the keeper with the rest."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mesh import keeper, local
from mesh.procs import Proc, alive, restart
from mesh.v2client import infer
from tests.mesh.local_mesh import gateway_client, mesh_cli, running_mesh
from tests.tiny import write_tiny_pipeline

MIDDLE = "keep-stage-1"


def test_the_back_off_starts_at_once_then_doubles_to_a_ceiling() -> None:
    waits = [keeper.backoff_s(n) for n in range(1, 9)]
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def _procs(state_dir: Path) -> dict[str, Proc]:
    state = local.read_state(state_dir)
    assert state is not None
    return {p.name: p for p in state.procs}


def _wait_for(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _answers(state_dir: Path, url: str) -> bool:
    try:
        with gateway_client(state_dir, timeout=10.0) as client:
            infer(client, url, "keep", {"x": np.ones((1, 16), np.float32)})
        return True
    except httpx.HTTPError:
        return False


def _restarts_logged(state_dir: Path, name: str) -> list[float]:
    """When the keeper's log says `name` was started again, as Unix times."""
    text = (state_dir / "logs" / "keeper.log").read_text()
    return [datetime.fromisoformat(m.group(1)).timestamp()
            for m in re.finditer(rf"^(\S+) {re.escape(name)} \(pid \d+\) exited \(exits in a row: \d+\); started again",
                                 text, re.M)]


def test_killed_processes_are_started_again_and_the_pipeline_answers(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "keep", name="keep")
    state_dir = tmp_path / ".mesh"
    with running_mesh(tmp_path / "keep", None, state_dir) as state:
        url = state.layout.gateway_url
        assert _answers(state_dir, url)
        before = _procs(state_dir)
        assert before["keeper"].role == "keeper" and alive(before["keeper"])
        victims = [f"{MIDDLE}-v1-0", f"{MIDDLE}-v1-0-sidecar", "gateway"]
        for name in victims:
            os.kill(before[name].pid, signal.SIGKILL)
        _wait_for(lambda: all(_procs(state_dir)[n].restarts == 1 and alive(_procs(state_dir)[n]) for n in victims))
        _wait_for(lambda: _answers(state_dir, url))
        after = _procs(state_dir)
        assert all(after[n].pid != before[n].pid for n in victims)
        assert all(after[n].pid == before[n].pid and after[n].restarts == 0 for n in before if n not in victims)
        status = mesh_cli("status", "--json", "--state-dir", str(state_dir))
        assert status.returncode == 0, status.stderr
        rows = {p["name"]: p for p in json.loads(status.stdout)["processes"]}
        assert {n: rows[n]["restarts"] for n in victims} == dict.fromkeys(victims, 1)

        # the same app killed again at once, and again: the second exit in a row waits 1 s, the third 2 s
        app = f"{MIDDLE}-v1-0"
        for _ in range(2):
            current = _procs(state_dir)[app]
            os.kill(current.pid, signal.SIGKILL)
            died = time.time()
            _wait_for(lambda: _procs(state_dir)[app].pid != current.pid)  # noqa: B023
        times = _restarts_logged(state_dir, app)
        assert len(times) == 3 and _procs(state_dir)[app].restarts == 3
        assert times[2] - died >= keeper.backoff_s(3) - 0.05
        _wait_for(lambda: _answers(state_dir, url))
        logs = mesh_cli("logs", "keeper", "--state-dir", str(state_dir))
        assert f"{app} (pid {current.pid}) exited (exits in a row: 3); started again" in logs.stdout
        assert "if it exits again, the next start waits 4 s" in logs.stdout
    # running_mesh's `down` left no process of the mesh, the keeper included


def test_with_no_restart_what_dies_stays_down(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "keep", name="keep")
    state_dir = tmp_path / ".mesh"
    with running_mesh(tmp_path / "keep", None, state_dir, "--no-restart"):
        procs = _procs(state_dir)
        assert "keeper" not in procs
        os.kill(procs[f"{MIDDLE}-v1-0"].pid, signal.SIGKILL)
        time.sleep(3 * keeper.POLL_S + 1.0)
        status = mesh_cli("status", "--state-dir", str(state_dir))
        assert status.returncode == 1
        assert f"{MIDDLE}-v1-0" in status.stderr and "nothing starts them again" in status.stderr


def test_a_process_that_cannot_be_started_again_waits_the_back_off_and_the_keeper_goes_on(
        tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    gone = Proc(name="app", role="app", stage="s", pid=1, start_ticks=0, log=str(tmp_path / "app.log"),
                cmd=[str(tmp_path / "no-such-binary")])
    kept = keeper.Keeper(tmp_path, os.getpid())
    assert kept._start_again(gone) is gone  # not a new process, and no exception out of the keeper
    assert kept.exits["app"] == 1 and "app" in kept.gone_since  # the back-off counts it
    said = capsys.readouterr().out
    assert "app (pid 1) exited (exits in a row: 1) and could not be started again: " in said
    assert "next try in 1 s" in said


def test_the_mesh_lock_is_shared_with_other_processes_and_reentrant(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / local.LOCK_FILE
    holder = subprocess.Popen(["flock", str(lock), "sleep", "3"])  # long past any stall of this process
    try:
        _wait_for(lock.exists, 10)
        time.sleep(0.2)
        with local.state_lock(tmp_path, wait=False) as held:
            assert held is False  # another process holds it: the keeper's way, try again later
        started = time.monotonic()
        with local.state_lock(tmp_path) as held, local.state_lock(tmp_path) as again:  # a command's: wait, once
            assert held and again and time.monotonic() - started > 0.5
        assert "waiting for another command that is changing this mesh" in capfd.readouterr().err
    finally:
        holder.wait(10)


def _take_port_of_killed(state_dir: Path, name: str, port: int) -> socket.socket:
    """SIGKILL process `name` and listen on `port` before anything can start it again (under the mesh's lock,
    which the keeper needs to start anything): another program taking the port of a crashed sidecar."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with local.state_lock(state_dir):
        victim = _procs(state_dir)[name]
        os.kill(victim.pid, signal.SIGKILL)
        _wait_for(lambda: not alive(victim), 10)
        _wait_for(lambda: _bound(taken, port), 10)  # the dead listener's connections close a moment later
        taken.listen()
    return taken


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def _middle_sidecar(state: local.State) -> tuple[str, int]:
    replica = next(r for r in state.layout.replicas if r.stage == MIDDLE)
    return f"{replica.name}-sidecar", replica.inbound_port


def test_a_sidecar_started_again_without_its_port_is_stopped_until_the_port_is_free(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "keep", name="keep")
    state_dir = tmp_path / ".mesh"
    with running_mesh(tmp_path / "keep", None, state_dir) as state:
        sidecar, port = _middle_sidecar(state)
        taken = _take_port_of_killed(state_dir, sidecar, port)
        try:
            fault = f"{sidecar} runs without its listener(s) inbound (127.0.0.1:{port})"
            log = state_dir / "logs" / "keeper.log"
            _wait_for(lambda: log.read_text().count(fault) >= 2, 30)  # started again, stopped, again
            assert f"{fault}: Envoy could not bind them (is another program on that port?); stopped it" \
                in log.read_text()
            assert not _answers(state_dir, state.layout.gateway_url)
            # between its tries too, down in the back-off, status says why
            assert fault in (_status_row(state_dir, sidecar)["problem"] or "")
        finally:
            taken.close()
        _wait_for(lambda: _answers(state_dir, state.layout.gateway_url))
        _wait_for(lambda: _status_row(state_dir, sidecar)["problem"] is None, 10)  # the keeper forgets it
        row = _status_row(state_dir, sidecar)
        assert row["ready"] is True and row["restarts"] >= 3


def _status_row(state_dir: Path, name: str) -> dict[str, Any]:
    status = json.loads(mesh_cli("status", "--json", "--state-dir", str(state_dir)).stdout)
    return next(p for p in status["processes"] if p["name"] == name)


def test_status_names_the_listener_an_envoy_runs_without(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "keep", name="keep")
    state_dir = tmp_path / ".mesh"
    with running_mesh(tmp_path / "keep", None, state_dir, "--no-restart") as state:
        sidecar, port = _middle_sidecar(state)
        taken = _take_port_of_killed(state_dir, sidecar, port)
        try:
            with local.state_lock(state_dir):  # started again by hand, as `--no-restart` leaves it
                current = local.read_state(state_dir)
                assert current is not None
                current.procs = [restart(p) if p.name == sidecar else p for p in current.procs]
                local.write_state(state_dir, current)
            problem = f"{sidecar} runs without its listener(s) inbound (127.0.0.1:{port}): Envoy could not bind them"

            def shown() -> bool:
                rows = json.loads(mesh_cli("status", "--json", "--state-dir", str(state_dir)).stdout)["processes"]
                row = next(p for p in rows if p["name"] == sidecar)
                return row["alive"] and row["ready"] is False and (row["problem"] or "").startswith(problem)

            _wait_for(shown, 30)
            text = mesh_cli("status", "--state-dir", str(state_dir))
            assert problem in " ".join(text.stdout.split())
        finally:
            taken.close()


def test_keep_starts_a_keeper_on_a_mesh_without_one_and_again_after_it_was_killed(tmp_path: Path) -> None:
    write_tiny_pipeline(tmp_path / "keep", name="keep")
    state_dir = tmp_path / ".mesh"
    where = ("--state-dir", str(state_dir))
    with running_mesh(tmp_path / "keep", None, state_dir, "--no-restart") as state:
        assert "keeper" not in _procs(state_dir)
        started = mesh_cli("keep", *where)
        assert started.returncode == 0 and "keeper started" in started.stdout, started.stderr
        again = mesh_cli("keep", *where)
        assert again.returncode == 2 and "the mesh's keeper already runs" in again.stderr
        app = _procs(state_dir)[f"{MIDDLE}-v1-0"]
        os.kill(app.pid, signal.SIGKILL)  # what exits is now started again
        _wait_for(lambda: _procs(state_dir)[app.name].restarts == 1 and alive(_procs(state_dir)[app.name]))
        _wait_for(lambda: _answers(state_dir, state.layout.gateway_url))

        first = _procs(state_dir)["keeper"]
        os.kill(first.pid, signal.SIGKILL)
        _wait_for(lambda: not alive(first), 10)
        status = mesh_cli("status", *where)
        assert status.returncode == 1
        assert f"the keeper is not running: nothing starts again what exits; `python -m mesh keep --state-dir " \
               f"{state_dir}` starts it again" in " ".join(status.stderr.split())
        assert mesh_cli("keep", *where).returncode == 0
        second = _procs(state_dir)["keeper"]
        assert second.pid != first.pid and alive(second) and second.restarts == 1
        assert [p.name for p in local.read_state(state_dir).procs].count("keeper") == 1  # type: ignore[union-attr]
        assert mesh_cli("status", *where).returncode == 0
