"""Istio's own files and tools, taken from Istio's Go modules at the one version `tools/istio/go.mod` pins.

The modules come through the Go module proxy into Go's module cache (outside the repository); nothing of
Istio is copied into the repository. Moving the Istio version is an edit of `tools/istio/go.mod` only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from tests.judges import gotools
from tests.judges.gotools import GoUnavailable, binaries_dir, go_binary

REPO = Path(__file__).resolve().parents[2]
TOOLS_MODULE = REPO / "tools" / "istio"  # the Go module whose go.mod names the Istio version
ISTIO = "istio.io/istio"
# Inside istio.io/istio: the CRDs Istio's base chart installs, and the valid/invalid example resources
# Istio's own validation tests use (each invalid document carries Istio's error in `_err`).
CRD_FILE = "manifests/charts/base/files/crd-all.gen.yaml"
EXAMPLES_DIR = "pkg/config/validation/testdata/crds"


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


def load_example(path: Path) -> list[dict[str, Any]]:
    """The documents of one of Istio's example files. PyYAML reads a bare IPv6 `001:db8::` inside a flow
    sequence as a one-key mapping, where Go's YAML (kubectl's) reads a string; such items are quoted, as
    the API server sees them."""
    text = re.sub(r"(?<=[\[,] )([0-9a-fA-F]*:[0-9a-fA-F:]*)(?=[\],])", r'"\1"', path.read_text())
    return [d for d in yaml.safe_load_all(text) if d]


# ------------------------------------------------------------------------------- Istio's binaries, cached

# The binaries we build, by name: Istio's own commands, and our small program in tools/istio that calls
# Istio's packages (its sources are part of what selects the cached binary).
TOOLS = {"istioctl": "istio.io/istio/istioctl/cmd/istioctl", "istio-judge": "./judge"}


def tool_path(name: str) -> Path:
    """Where the binary `name` lives: under the binaries of this go.mod/go.sum (moving the Istio version
    selects a fresh directory), and for our own program also named by a digest of its source."""
    package = TOOLS[name]
    filename = name
    if package.startswith("./"):
        digest = hashlib.sha256()
        for source in sorted((TOOLS_MODULE / package).glob("*.go")):
            digest.update(source.read_bytes())
        filename = f"{name}-{digest.hexdigest()[:12]}"
    return binaries_dir(TOOLS_MODULE) / filename


def tool(name: str) -> Path:
    """The path of a built binary, or ToolMissing naming the make target that builds it."""
    path = tool_path(name)
    if not path.is_file():
        raise ToolMissing(f"{name} is not built for this Istio version: run `make istio-tools` ({path} missing)")
    return path


class ToolMissing(RuntimeError):
    """An Istio binary has not been built yet."""


def build(name: str, *, out: TextIO = sys.stdout) -> Path:
    """Build one of TOOLS into tool_path(name) unless it is there, printing progress and the time it took."""
    # Without -trimpath: iterating on judge/ with `go build`/`go vet` in tools/istio then reuses the ~2000
    # compiled Istio packages instead of compiling them all again (half an hour on 2 cores).
    return gotools.build(TOOLS_MODULE, TOOLS[name], tool_path(name), trimpath=False, out=out)


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
