"""Launch real stage processes (`python -m stage_service`) on loopback: for the tests and the benchmarks.

    chain = start_chain(manifest_path)            # every stage, each forwarding to the next, all ready
    chain[0].url                                  # http://127.0.0.1:<port>
    stop_all(chain)                               # SIGTERM, wait, return codes

Each process logs to a file (`StageProcess.log_path`, read with `.log()`), so a failing test can show why.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model_export.manifest import load_manifest
from stage_service.settings import StageSettings
from stage_service.supervisor import Child, Target, http_ready, wait_ready

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stage_command() -> list[str]:
    return [sys.executable, "-m", "stage_service"]


@dataclass(kw_only=True)
class StageProcess(Child):
    """One running stage process."""

    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def health_target(self) -> Target:
        """Ready once `/v2/health/ready` answers 200."""
        return self.target(http_ready(f"{self.url}/v2/health/ready"))


def stage_env(manifest: Path, name: str, port: int, next_url: str | None = None,
              extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one stage process: the caller's, without inherited STAGE_*, plus these settings."""
    # Built without validation (and without reading this process's STAGE_*): the stage validates its
    # environment itself at start-up and names the variable at fault.
    settings = StageSettings.model_construct(manifest=manifest, name=name, host=HOST, port=port, threads=1,
                                             log_level="warning", next_url=next_url or None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE_")}
    env.update({"PYTHONUNBUFFERED": "1", **settings.to_env(), **(extra or {})})
    return env


def launch(env: Mapping[str, str], name: str, port: int, log_dir: Path | None = None) -> StageProcess:
    """Start `python -m stage_service` with exactly this environment; do not wait."""
    directory = log_dir or Path(tempfile.mkdtemp(prefix="stage-logs-"))
    return StageProcess.start(name, stage_command(), directory / f"{name}-{port}.log", env=env, port=port)


def start_stage(manifest: Path, name: str, *, next_url: str | None = None, port: int | None = None,
                env: Mapping[str, str] | None = None, log_dir: Path | None = None, ready: bool = True,
                timeout: float = 60.0) -> StageProcess:
    """Start one stage on a free loopback port (`env` adds or overrides STAGE_* settings)."""
    port = port or free_port()
    stage = launch(stage_env(manifest, name, port, next_url, env), name, port, log_dir)
    if ready:
        try:
            wait_ready([stage.health_target()], timeout)
        except BaseException:
            stage.stop(signal.SIGKILL)
            raise
    return stage


def start_chain(manifest: Path, *, env: Mapping[str, str] | None = None, log_dir: Path | None = None,
                timeout: float = 60.0) -> list[StageProcess]:
    """Every stage of the manifest, each forwarding to the next, all started at once and all ready."""
    names = [s.name for s in load_manifest(manifest).stages]
    ports = [free_port() for _ in names]
    stages: list[StageProcess] = []
    try:
        for i, (name, port) in enumerate(zip(names, ports, strict=True)):
            next_url = f"http://{HOST}:{ports[i + 1]}" if i + 1 < len(names) else None
            stages.append(launch(stage_env(manifest, name, port, next_url, env), name, port, log_dir))
        wait_ready([stage.health_target() for stage in stages], timeout)
    except BaseException:
        stop_all(stages, signal.SIGKILL)
        raise
    return stages


def stop_all(stages: list[StageProcess], sig: int = signal.SIGTERM) -> list[int]:
    """Stop every stage (first to last); return their exit codes."""
    for stage in stages:
        stage.send(sig)
    return [stage.stop(sig) for stage in stages]
