"""The Docker engine, the stage image and stage containers, through the `docker` command line: what
`make image` and a user run, nothing in between."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.image.build_context import ROOT

# Every container these tests start carries the run's id, so the run removes all of its own, and the pid of
# the test process, so a later run removes those of a run that was killed before it could.
LABEL = "meshpipe.test"
PID_LABEL = "meshpipe.test.pid"
STAGE_UID = 10001
MOUNT = "/models"


class DockerError(RuntimeError):
    pass


def docker(*args: str, timeout: float = 120.0) -> str:
    """Run `docker ARGS`; its stdout, or DockerError with its stderr."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise DockerError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result.stdout


def start_engine(timeout: float = 600.0) -> None:
    """scripts/docker-engine.sh: the engine answers, or one line saying why not."""
    result = subprocess.run([ROOT / "scripts" / "docker-engine.sh"], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise DockerError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no Docker engine")


@dataclass(frozen=True)
class BuiltImage:
    id: str
    report: str  # stage-image.sh's closing line: tag, variant, base, size, build time
    size_bytes: int


def build_image(work: Path, variant: str = "cpu", timeout: float = 900.0) -> BuiltImage:
    """`scripts/stage-image.sh VARIANT` (as `make image`); the image by id, so a build from another tree
    tagging the same name meanwhile cannot swap it."""
    iidfile = work / f"{variant}.iid"
    result = subprocess.run([ROOT / "scripts" / "stage-image.sh", variant, "--iidfile", str(iidfile)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise DockerError(f"stage-image.sh {variant} exited {result.returncode}:\n"
                          f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    image = iidfile.read_text().strip()
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image))
    return BuiltImage(id=image, report=result.stderr.strip().splitlines()[-1], size_bytes=size)


@dataclass(frozen=True)
class StageContainer:
    name: str
    stage: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = subprocess.run(["docker", "logs", "--tail", "60", self.name], capture_output=True, text=True,
                                timeout=30)
        return result.stdout + result.stderr

    def state(self, field: str) -> str:
        return docker("inspect", "-f", f"{{{{.State.{field}}}}}", self.name).strip()


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def run_stage(image: str, run_id: str, pipeline: Path, stage: str, port: int,
              next_url: str | None = None) -> StageContainer:
    """One stage container as the cluster runs it: the image's own user, read-only root with a /tmp
    tmpfs, no capabilities, the pipeline directory mounted read-only; on the host's network (loopback)."""
    name = f"meshpipe-test-{run_id}-{stage}-{port}"
    env = {"STAGE_MANIFEST": f"{MOUNT}/pipeline.json", "STAGE_NAME": stage, "STAGE_HOST": "127.0.0.1",
           "STAGE_PORT": str(port), "STAGE_THREADS": "1", "STAGE_LOG_LEVEL": "warning"}
    if next_url:
        env["STAGE_NEXT_URL"] = next_url
    args = ["run", "--detach", "--name", name, "--label", f"{LABEL}={run_id}", "--label", f"{PID_LABEL}={os.getpid()}",
            "--network", "host",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{pipeline}:{MOUNT}:ro"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    docker(*args, image)
    return StageContainer(name=name, stage=stage, port=port)


def wait_ready(container: StageContainer, timeout: float = 90.0) -> None:
    """Poll `/v2/health/ready` until 200; raise with the container's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if container.state("Running") != "true":
            raise DockerError(f"{container.name} exited with {container.state('ExitCode')}:\n{container.logs()}")
        try:
            if httpx.get(f"{container.url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise DockerError(f"{container.name} not ready within {timeout} s:\n{container.logs()}")


def process_uids(container: StageContainer) -> list[int]:
    """The UID of every process in the container, as the host's `ps` sees them (`docker top`)."""
    lines = docker("top", container.name, "-eo", "uid,pid,args").splitlines()
    return [int(line.split()[0]) for line in lines[1:] if line.strip()]


def remove(*containers: StageContainer) -> None:
    docker("rm", "--force", "--volumes", *[c.name for c in containers])


def remove_run(run_id: str) -> None:
    """Remove every container of this run, running or not."""
    ids = docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}={run_id}").split()
    if ids:
        docker("rm", "--force", "--volumes", *ids)


def remove_orphans() -> None:
    """Remove the containers of test runs whose process is gone (killed before their teardown)."""
    listed = docker("ps", "--all", "--filter", f"label={PID_LABEL}",
                    "--format", f'{{{{.ID}}}} {{{{.Label "{PID_LABEL}"}}}}')
    orphans = [cid for cid, _, pid in (line.partition(" ") for line in listed.splitlines())
               if pid.isdigit() and not Path(f"/proc/{pid}").exists()]
    if orphans:
        docker("rm", "--force", "--volumes", *orphans)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout} s: {what}")
