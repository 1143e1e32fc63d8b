"""The local mesh's Unix domain sockets: where no other user of the machine can reach them.

Every stage app (REST and gRPC), every sidecar's outbound listener (the app's way to the next stage) and the
Envoy admin of every sidecar and of the gateway listen on a socket in one directory of mode 0700, owned by
the user who runs the mesh: the kernel refuses anyone else (EACCES) before any byte is sent, so the only
way into a stage is its sidecar's mTLS listener. In a Kubernetes pod the network namespace is that boundary.

Socket names are short (`<slot>.<role>`): a socket's path holds at most 107 bytes. Where the state directory
is too deep for that, the directory is made with `mkdtemp` (also 0700) and `down` removes it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import httpx

from stage_service.settings import MAX_SOCKET_PATH

SOCKET_DIR = "sock"  # under the state directory
# The longest name given in the directory (a replica's `<slot>.admin` is shorter while slots stay below 10**7).
LONGEST_NAME = len("gateway.admin")
# What a request over a socket names as its host: Envoy's routes take any, uvicorn ignores it.
LOCAL_BASE = "http://localhost"
ADMIN_TIMEOUT_S = 5.0


class SocketDirError(RuntimeError):
    """The socket directory cannot be made private."""


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask, and an existing directory keeps its own
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise SocketDirError(f"{path} must be a directory of mode 0700 owned by uid {os.getuid()}")
    return path


def make_dir(state_dir: Path) -> Path:
    """A fresh, empty private socket directory for a mesh run from `state_dir` (absolute)."""
    preferred = state_dir.resolve() / SOCKET_DIR
    shutil.rmtree(preferred, ignore_errors=True)  # sockets of a mesh that is gone
    if len(os.fsencode(preferred)) + 1 + LONGEST_NAME <= MAX_SOCKET_PATH:
        return _private_dir(preferred)
    return _private_dir(Path(tempfile.mkdtemp(prefix="mesh-sock-")))


def remove_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def path(directory: Path, slot: int | str, role: str) -> str:
    """The socket of one process's `role` (`app`, `grpc`, `out`, `admin`)."""
    return str(directory / f"{slot}.{role}")


def client(socket: str, timeout: float = ADMIN_TIMEOUT_S, **kwargs: Any) -> httpx.Client:
    """An httpx client whose every connection goes to `socket`; request URLs start with LOCAL_BASE."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url=LOCAL_BASE, timeout=timeout, **kwargs)


def get(socket: str, url_path: str, timeout: float = ADMIN_TIMEOUT_S, **params: str) -> httpx.Response:
    """One GET over `socket` (an Envoy admin, an app): raises httpx.HTTPError where nothing answers."""
    with client(socket, timeout) as c:
        return c.get(url_path, params=params)
