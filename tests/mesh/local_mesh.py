"""Helpers for the local-mesh tests: run the real CLI, find leftover processes, make TLS clients, keep steady
load on the gateway while the mesh changes under it (`PhasedLoad`)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from mesh import local, pki

REPO = Path(__file__).resolve().parents[2]


def mesh_cli(*args: str, timeout: float = 180.0, cwd: Path = REPO,
             columns: int = 200) -> subprocess.CompletedProcess[str]:
    """`python -m mesh ARGS` as a user runs it, from the repository root (or `cwd`)."""
    return subprocess.run([sys.executable, "-m", "mesh", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": str(columns)})


def processes_of(state_dir: Path) -> list[int]:
    """Pids of live processes that carry this state directory's marker (see local.MARKER_ENV)."""
    marker = f"{local.MARKER_ENV}={state_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def write_policy(path: Path, policy: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(policy))
    return path


@contextmanager
def running_mesh(pipeline: Path, policy: Path | None, state_dir: Path, *more: str) -> Iterator[local.State]:
    """`mesh up --detach` (and `more` options) on a free gateway port; `mesh down` afterwards, which must leave
    no process."""
    args = ["up", "--pipeline", str(pipeline), "--detach", "--gateway-port", "0", "--state-dir", str(state_dir),
            *more]
    if policy is not None:
        args += ["--policy", str(policy)]
    result = mesh_cli(*args)
    assert result.returncode == 0, f"mesh up failed:\n{result.stdout}\n{result.stderr}"
    state = local.read_state(state_dir)
    assert state is not None
    try:
        yield state
    finally:
        mesh_cli("down", "--state-dir", str(state_dir))
        assert processes_of(state_dir) == []


def gateway_client(state_dir: Path, timeout: float = 30.0, **options: Any) -> httpx.Client:
    """An httpx client of the running mesh's gateway: its certificate checked against the mesh's CA, a fresh
    token on every request (the mesh's own `gateway_credentials`)."""
    return local.gateway_credentials(state_dir, subject="tests").client(timeout=timeout, **options)


def mtls_client(state_dir: Path, spiffe_id: str, tmp: Path) -> httpx.Client:
    """An httpx client presenting a certificate from the mesh's CA with `spiffe_id` as its identity.

    The sidecars' certificates carry only a SPIFFE URI SAN (no host name), as Istio's do: the chain is
    checked against the mesh CA, host name checking is off.
    """
    ca = pki.CertPair(state_dir / "pki" / "ca.pem", state_dir / "pki" / "ca-key.pem")
    pair = pki.issue(ca, spiffe_id, tmp, spiffe_id.rsplit("/", 1)[-1])
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.check_hostname = False
    context.load_cert_chain(str(pair.cert), str(pair.key))
    return httpx.Client(verify=context, timeout=30.0)


def copy_pipeline(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# One request through the gateway: what served it (a version, a split) and what was wrong with the answer, if any.
Check = Callable[[httpx.Client], tuple[str, str | None]]


class PhasedLoad:
    """Steady requests from `clients` threads through the gateway while the test changes the mesh: each answer
    is counted, by what served it, in the phase being counted (`count`); every problem is kept with its phase.
    Use as a context manager: the threads start on entry and are stopped and joined on exit."""

    def __init__(self, gateway: local.GatewayCredentials, check: Check, clients: int = 2,
                 settle_s: float = 0.0) -> None:
        self.gateway, self.check, self.settle_s = gateway, check, settle_s
        self.phase: str | None = None
        self.served: dict[str, Counter[str]] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self) -> PhasedLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=70)

    def _loop(self) -> None:
        with self.gateway.client(timeout=60.0) as client:
            while not self.stop.is_set():
                served, problem = self.check(client)
                with self.lock:
                    if problem:
                        self.failures.append(f"{self.phase}: {problem}")
                    elif self.phase is not None:
                        self.served.setdefault(self.phase, Counter())[served] += 1

    def count(self, phase: str, requests: int, deadline_s: float = 120.0) -> Counter[str]:
        """Count the next `requests` answers as `phase` (after `settle_s`)."""
        time.sleep(self.settle_s)
        with self.lock:
            self.phase = phase
        end = time.monotonic() + deadline_s
        while sum(self.served.get(phase, Counter()).values()) < requests and time.monotonic() < end:
            time.sleep(0.05)
        with self.lock:
            self.phase = None
            return Counter(self.served.get(phase, Counter()))


def assert_share(served: Counter[str], split: str, weight: int, everything: object) -> None:
    """`split`'s share of `served` is its weight, within 5 standard deviations of the binomial count (each
    unassigned request is assigned independently: a tighter bound would fail by chance now and then)."""
    n, p = sum(served.values()), weight / 100
    assert abs(served[split] - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, everything
