"""Istio's own files and tools, taken from Istio's Go modules at the one version `tools/istio/go.mod` pins.

The modules come through the Go module proxy into Go's module cache (outside the repository); nothing of
Istio is copied into the repository. Moving the Istio version is an edit of `tools/istio/go.mod` only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, TextIO

REPO = Path(__file__).resolve().parents[2]
TOOLS_MODULE = REPO / "tools" / "istio"  # the Go module whose go.mod names the Istio version
ISTIO = "istio.io/istio"
# Inside istio.io/istio: the CRDs Istio's base chart installs, and the valid/invalid example resources
# Istio's own validation tests use (each invalid document carries Istio's error in `_err`).
CRD_FILE = "manifests/charts/base/files/crd-all.gen.yaml"
EXAMPLES_DIR = "pkg/config/validation/testdata/crds"


class GoUnavailable(RuntimeError):
    """The Go toolchain is missing or cannot fetch a module; the message says which and what to do."""


def go_binary() -> str:
    """The `go` command, or GoUnavailable saying Go >= 1.26 is needed."""
    found = shutil.which("go")
    if found is None:
        raise GoUnavailable("Go >= 1.26 is needed to fetch Istio's modules (`go` not on PATH)")
    return found


def _go_json(*args: str) -> dict[str, Any]:
    """Run `go ARGS` inside tools/istio and decode its one JSON object."""
    done = subprocess.run([go_binary(), *args], cwd=TOOLS_MODULE, capture_output=True, text=True, check=False)
    try:
        decoded: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        decoded = {}
    error = decoded.get("Error") or (done.stderr.strip() if done.returncode else "")
    if error:
        raise GoUnavailable(f"`go {' '.join(args)}` in {TOOLS_MODULE} failed: {error}")
    return decoded


@functools.cache
def module_version(module: str = ISTIO) -> str:
    """The version of `module` that tools/istio selects (its go.mod pins istio.io/istio; the rest follows)."""
    return str(_go_json("list", "-m", "-json", module)["Version"])


@functools.cache
def module_dir(module: str = ISTIO) -> Path:
    """The read-only source tree of `module` at the version tools/istio selects, fetched when missing."""
    info = _go_json("mod", "download", "-json", module)
    directory = Path(info["Dir"])
    if not directory.is_dir():
        raise GoUnavailable(f"`go mod download` named {directory} for {module}, which is not a directory")
    return directory


def crd_file() -> Path:
    """Istio's CustomResourceDefinitions (`crd-all.gen.yaml` of Istio's base chart)."""
    return module_dir(ISTIO) / CRD_FILE


def examples_dir() -> Path:
    """Istio's valid and invalid example resources (`*-valid.yaml`, `*-invalid.yaml`)."""
    return module_dir(ISTIO) / EXAMPLES_DIR


# ------------------------------------------------------------------------------- Istio's binaries, cached

# Go packages of Istio that we build into binaries, by binary name (all listed as `tool` in tools/istio/go.mod).
TOOLS = {"istioctl": "istio.io/istio/istioctl/cmd/istioctl"}


def cache_root() -> Path:
    """Where built binaries live: outside the repository, shared by every clone on the machine."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshpipe" / "istio"


def tools_dir() -> Path:
    """The binaries for exactly this go.mod/go.sum: moving the Istio version selects a fresh directory."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((TOOLS_MODULE / name).read_bytes())
    return cache_root() / digest.hexdigest()[:16]


def tool(name: str) -> Path:
    """The path of a built Istio binary, or ToolMissing naming the make target that builds it."""
    path = tools_dir() / name
    if not path.is_file():
        raise ToolMissing(f"{name} is not built for this Istio version: run `make istio-tools` ({path} missing)")
    return path


class ToolMissing(RuntimeError):
    """An Istio binary has not been built yet."""


def build(name: str, *, out: TextIO = sys.stdout) -> Path:
    """Build one of TOOLS into tools_dir() unless it is there, printing progress and the time it took."""
    target = tools_dir() / name
    if target.is_file():
        return target
    package = TOOLS[name]
    deps = subprocess.run([go_binary(), "list", "-deps", package], cwd=TOOLS_MODULE, capture_output=True,
                          text=True, check=False)
    if deps.returncode:
        raise GoUnavailable(f"`go list -deps {package}` failed: {deps.stderr.strip()}")
    total = len(deps.stdout.split())
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    started = time.monotonic()
    print(f"building {name} from {package}@{module_version()} ({total} packages; Go's build cache makes "
          f"rebuilds fast)", file=out, flush=True)
    command = [go_binary(), "build", "-v", "-buildvcs=false", "-o", str(partial), package]
    with subprocess.Popen(command, cwd=TOOLS_MODULE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        lines = _report_progress(proc.stdout, total, started, out)
    if proc.returncode:
        raise GoUnavailable(f"building {name} failed:\n" + "\n".join(lines[-20:]))
    partial.replace(target)
    print(f"built {target} in {time.monotonic() - started:.0f} s", file=out, flush=True)
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


def main(argv: list[str]) -> int:
    """`python -m tests.judges.istio build [NAME...]`: build the named (default: all) Istio binaries."""
    if not argv or argv[0] != "build":
        print("usage: python -m tests.judges.istio build [" + "|".join(TOOLS) + " ...]", file=sys.stderr)
        return 2
    names = argv[1:] or list(TOOLS)
    unknown = sorted(set(names) - set(TOOLS))
    if unknown:
        print(f"unknown tool {', '.join(unknown)}; expected one of {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            print(build(name))
    except GoUnavailable as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
