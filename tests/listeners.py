"""What a process listens on, read from /proc: its socket file descriptors matched in the kernel's tables."""

from __future__ import annotations

import os
from pathlib import Path

TCP_LISTEN = "0A"  # the st column of /proc/net/tcp
UNIX_ACCEPTING = 0x10000  # __SO_ACCEPTCON in the Flags column of /proc/net/unix


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports (v4 and v6) the process itself listens on: its socket fds matched in /proc/net/tcp*."""
    own = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[9]) in own:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def unix_listening_paths(pid: int) -> set[str]:
    own = _socket_inodes(pid)
    paths = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and int(fields[3], 16) & UNIX_ACCEPTING and int(fields[6]) in own:
            paths.add(fields[7])
    return paths
