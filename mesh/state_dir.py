"""Where the local mesh's state directory is, so every `python -m mesh` command finds the same mesh from
any working directory.

`up` puts it in `.mesh/` of the project: the nearest directory, from the working directory upwards, that
already has a `.mesh/`, else the working directory. It also records the directory's absolute path in a
user-level file (`$XDG_STATE_HOME/meshpipe/state-dir`, default `~/.local/state/...`), newest first beside the
others recorded before it (up to RECORDED_MAX). Every other command, without `--state-dir`, takes the first of
these that holds a mesh: the `.mesh/` directories from the working directory upwards, then the recorded ones,
newest first. A running mesh (its `state.json`) wins over a stopped one (the `last-state.json` that `down`
leaves, so `logs` and `trace` still work after it): with two meshes up, `down` of the newer leaves the older
found from anywhere, not a record of a stopped one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_NAME = ".mesh"
RECORDED_MAX = 8
RUNNING = "state.json"  # local.STATE_FILE: written by `up`, removed by `down`
STOPPED = "last-state.json"  # local.LAST_STATE_FILE: the stopped mesh's record


def record_file() -> Path:
    """The user-level file naming the state directories of the meshes `up` started, newest first."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshpipe" / "state-dir"


def record(state_dir: Path) -> None:
    """Remember `state_dir` as the newest mesh started, before the others still there (best effort: a read-only
    home only loses the record)."""
    path = record_file()
    newest = state_dir.resolve()
    kept = [newest, *(d for d in recorded() if d != newest and d.is_dir())][:RECORDED_MAX]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text("".join(f"{d}\n" for d in kept))
        os.replace(tmp, path)


def recorded() -> list[Path]:
    """The state directories of the meshes `up` started, newest first (none if there is no record)."""
    try:
        text = record_file().read_text()
    except OSError:
        return []
    return [Path(line) for line in text.splitlines() if line.strip()]


def _upwards(start: Path) -> list[Path]:
    return [d / DIR_NAME for d in (start, *start.parents) if (d / DIR_NAME).is_dir()]


def for_up(explicit: Path | None, cwd: Path | None = None) -> Path:
    """Where `up` keeps its state: `explicit`, else the nearest `.mesh/` upwards, else `./.mesh`."""
    if explicit is not None:
        return explicit
    cwd = (cwd or Path.cwd()).resolve()
    found = _upwards(cwd)
    return found[0] if found else cwd / DIR_NAME


def candidates(cwd: Path | None = None) -> list[Path]:
    """Where a mesh may be, in the order searched: `.mesh/` upwards from `cwd`, then the recorded ones."""
    out = _upwards((cwd or Path.cwd()).resolve())
    for directory in recorded():
        if directory.resolve() not in [p.resolve() for p in out]:
            out.append(directory)
    return out


def find(explicit: Path | None, cwd: Path | None = None) -> Path:
    """The state directory a command acts on: `explicit`; else the first candidate with a running mesh;
    else the first with a stopped one; else `./.mesh` (whose absence the command then reports)."""
    if explicit is not None:
        return explicit
    found = candidates(cwd)
    for marker in (RUNNING, STOPPED):
        for directory in found:
            if (directory / marker).is_file():
                return directory
    return (cwd or Path.cwd()).resolve() / DIR_NAME


def searched(cwd: Path | None = None) -> str:
    """Where `find` looked, for a message that says so."""
    places = [str(p) for p in candidates(cwd)] or [str((cwd or Path.cwd()).resolve() / DIR_NAME)]
    return f"looked in {', '.join(places)} and the record {record_file()}"
