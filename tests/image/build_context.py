"""The stage image's build context as Docker filters it, read with the Docker SDK's port of Docker's own
`.dockerignore` matching (`docker.utils.build.exclude_paths`), and the COPY sources of a Dockerfile."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from docker.utils.build import exclude_paths

ROOT = Path(__file__).resolve().parents[2]
# Sent with the context whatever .dockerignore says, but never copied by COPY or ADD.
BUILD_FILES = {"Dockerfile", ".dockerignore"}


def ignore_patterns(root: Path) -> list[str]:
    """The patterns of root/.dockerignore, read as `docker.api.build` reads them."""
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def context_files(root: Path = ROOT) -> set[str]:
    """Every regular file of the build context that COPY can copy, relative to root, '/'-separated."""
    kept = exclude_paths(str(root), ignore_patterns(root))
    return {p for p in kept if (root / p).is_file() and p not in BUILD_FILES}


def copy_sources(dockerfile: Path) -> list[str]:
    """The sources of every COPY/ADD from the build context (not `--from` another stage), continuation
    lines joined, in order."""
    text = dockerfile.read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in {"COPY", "ADD"}:
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def missing_sources(root: Path, dockerfile: Path) -> list[str]:
    """COPY sources with nothing left of them in the filtered context: a file not there, or a directory
    (`.` included) with no file under it."""
    files = context_files(root)
    missing = []
    for source in copy_sources(dockerfile):
        path = source.strip("/").removeprefix("./")
        if path in ("", "."):
            present = bool(files)
        elif any(c in path for c in "*?["):
            present = any(fnmatch(f, path) for f in files)
        else:
            present = path in files or any(f.startswith(f"{path}/") for f in files)
        if not present:
            missing.append(source)
    return missing
