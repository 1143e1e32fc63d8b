"""Binaries built from the Go modules that a small module of ours under tools/ pins, cached outside the
repository: `<cache>/meshpipe/<name>/<hash of its go.mod and go.sum>/`, so moving a pin builds anew and
nothing stale is reused. Used by the Istio (tools/istio) and Kubernetes (tools/kube) judges."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TextIO


class GoUnavailable(RuntimeError):
    """The Go toolchain is missing, cannot fetch a module or cannot build; the message says which."""


def go_binary() -> str:
    """The `go` command, or GoUnavailable saying Go >= 1.26 is needed."""
    found = shutil.which("go")
    if found is None:
        raise GoUnavailable("Go >= 1.26 is needed to fetch and build the pinned Go modules (`go` not on PATH)")
    return found


def cache_root() -> Path:
    """Where built binaries live: outside the repository, shared by every clone on the machine."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshpipe"


def binaries_dir(module: Path) -> Path:
    """The cache directory for binaries of exactly this module's go.mod and go.sum."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((module / name).read_bytes())
    return cache_root() / module.name / digest.hexdigest()[:16]


def build(module: Path, package: str, target: Path, *, env: Mapping[str, str] | None = None,
          ldflags: str = "", trimpath: bool = True, out: TextIO = sys.stdout) -> Path:
    """`go build` `package` inside `module` into `target` unless it is there, printing progress and time.
    `trimpath=False` shares Go's compiled packages with a plain `go build`/`go vet` in `module` (-trimpath
    changes every package's cache key)."""
    if target.is_file():
        return target
    go = go_binary()
    environ = {**os.environ, **(env or {})}
    deps = subprocess.run([go, "list", "-deps", package], cwd=module, env=environ, capture_output=True, text=True,
                          check=False)
    if deps.returncode:
        raise GoUnavailable(f"`go list -deps {package}` in {module} failed: {deps.stderr.strip()}")
    total = len(deps.stdout.split())
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    started = time.monotonic()
    print(f"building {target.name} from {package} ({total} packages; Go's build cache makes rebuilds fast)",
          file=out, flush=True)
    command = [go, "build", "-v", "-buildvcs=false", *(["-trimpath"] if trimpath else []), "-ldflags", ldflags,
               "-o", str(partial), package]
    with subprocess.Popen(command, cwd=module, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        lines = _report_progress(proc.stdout, total, started, out)
    if proc.returncode:
        partial.unlink(missing_ok=True)
        raise GoUnavailable(f"building {target.name} failed:\n" + "\n".join(lines[-20:]))
    partial.replace(target)
    size_mb = target.stat().st_size / 1e6
    print(f"built {target} in {time.monotonic() - started:.0f} s ({size_mb:.0f} MB)", file=out, flush=True)
    return target


def _report_progress(stream: IO[str], total: int, started: float, out: TextIO) -> list[str]:
    """Echo a progress line every 100 compiled packages (`go build -v` names each); return the output."""
    lines: list[str] = []
    for line in stream:
        lines.append(line.rstrip())
        if len(lines) % 100 == 0:
            print(f"  {len(lines)} of at most {total} packages compiled, {time.monotonic() - started:.0f} s",
                  file=out, flush=True)
    return lines
