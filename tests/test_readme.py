"""The README is executable: its shell blocks run as written, in order, in a fresh copy of the repository.

Every fenced ```sh block of README.md is one test, run with bash (`-e -o pipefail`) from the copy's root.
A block that needs what this machine does not have (a Kubernetes cluster, a registry, the test suite that
runs this very test) is marked by the HTML comment right before it,

    <!-- readme-test: skip (needs a cluster) -->

and is reported as skipped with that reason, by name. After the last block the copy must hold nothing
that git would commit: every output lies under build/ or another ignored path.

The copy holds what a clone would (tracked files, plus new ones git does not ignore) in a git repository
of its own. Its `.venv` points into this checkout's (installed by `make venv` before the tests run), with
its own `make` stamp, so `make demo` in the copy installs nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
BLOCK_TIMEOUT_S = 600
GATEWAY_PORT = 8080  # mesh.yaml's gateway.port, which the README's commands call
PORT_WAIT_S = 180


@dataclass(frozen=True)
class Block:
    name: str  # "<section heading, as a slug> #<n>": the n-th shell block under that heading
    line: int  # of the opening fence, 1-based
    script: str
    skip: str | None  # the marker's reason, None: run it


def shell_blocks(text: str) -> list[Block]:
    """Every ```sh / ```bash block in order, its indentation removed, with the skip marker before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, count, i = "top", 0, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading, count = "-".join(re.findall(r"[a-z0-9]+", line.lower())[:4]), 0
        fence = FENCE.match(line)
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if fence["lang"] in ("sh", "bash"):
            indent = len(fence["indent"])
            body = "\n".join(x[indent:] if x[:indent].strip() == "" else x for x in lines[i + 1:end])
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.search(before)
            count += 1
            blocks.append(Block(f"{heading} #{count}", i + 1, body + "\n", marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = shell_blocks(README.read_text())


def _copy_of_checkout(dst: Path) -> None:
    """The files a clone would have (tracked, and untracked ones git does not ignore), as committed files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not there
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    git = ["git", "-c", "user.name=readme", "-c", "user.email=readme@test", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *args], cwd=dst, check=True, capture_output=True)


def _venv_into(dst: Path) -> None:
    """`.venv` of the copy: this checkout's interpreter and packages, and a fresh `make` stamp of its own."""
    venv = REPO / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"{venv} is missing: run `make venv` (or `make test`, which makes it) first")
    (dst / ".venv").mkdir()
    for entry in venv.iterdir():
        if entry.name != ".installed":
            (dst / ".venv" / entry.name).symlink_to(entry)
    (dst / ".venv" / ".installed").touch()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("readme") / "meshpipe"
    root.mkdir()
    _copy_of_checkout(root)
    _venv_into(root)
    yield root
    # A block that failed half-way may leave a mesh running: stop it, whatever the state.
    subprocess.run([str(root / ".venv" / "bin" / "python"), "-m", "mesh", "down", "--state-dir",
                    str(root / ".mesh")], cwd=root, capture_output=True, timeout=120)


def _wait_for_free_port(port: int, timeout_s: float) -> None:
    """On a shared machine another checkout's `make demo` may hold the README's port for a minute."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"port {port}, which the README's mesh listens on, stayed taken for {timeout_s:.0f} s")
        time.sleep(1.0)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs_as_written(block: Block, checkout: Path) -> None:
    if block.skip:
        pytest.skip(f"README line {block.line}, {block.name!r}: {block.skip}")
    if "mesh up" in block.script or "make demo" in block.script:
        _wait_for_free_port(GATEWAY_PORT, PORT_WAIT_S)
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.script], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (
        f"README line {block.line} ({block.name}) exited {result.returncode}:\n{block.script}\n"
        f"--- stdout (end)\n{result.stdout[-4000:]}\n--- stderr (end)\n{result.stderr[-4000:]}")


def test_blocks_leave_nothing_to_commit(checkout: Path) -> None:
    """Runs after every block (pytest keeps file order): outputs go under build/ or ignored paths."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, check=True, capture_output=True,
                            text=True).stdout
    assert status == "", f"the README's commands left files that are not ignored:\n{status}"


def test_marked_blocks_say_why() -> None:
    assert BLOCKS, "no ```sh block found in README.md"
    assert all(b.skip is None or b.skip.strip() for b in BLOCKS)
    names = [b.name for b in BLOCKS]
    assert len(set(names)) == len(names), "two README blocks share a name; give one its own heading"


def test_the_parser_reads_markers_and_indented_blocks() -> None:
    text = ("# A\n\n```sh\necho one\n```\n\n1. step\n\n   <!-- readme-test: skip (needs a cluster) -->\n"
            "   ```sh\n   kubectl get pods\n   ```\n\n```\nnot a shell block\n```\n## B\n```bash\necho two\n```\n")
    assert shell_blocks(text) == [
        Block("a #1", 3, "echo one\n", None),
        Block("a #2", 10, "kubectl get pods\n", "needs a cluster"),
        Block("b #1", 18, "echo two\n", None),
    ]
