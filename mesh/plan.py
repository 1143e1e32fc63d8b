"""The plan of hops: `mesh.yaml` joined with the manifest, every value concrete, decided once.

`resolve(policy, manifest)` returns a `Plan`: per stage what runs (`StagePlan`), and per caller → callee hop
everything both meshes need (`Hop`): both identities, the route (timeout, retries, weighted versions,
fault injection), the upstream cluster (connection pool, outlier detection, buffer limit, mTLS with the
SAN it expects) and the callee's inbound authorization. The local Envoy config (`envoy_config`), the
Istio resources (`render`) and each process's `STAGE_*` environment (`Plan.settings(...).to_env()`) are
writers of this plan, so they cannot disagree.

Three things the two meshes once decided apart, decided here:

- **A version at weight 0** stays deployed (its replicas, subset and cluster exist, so raising its weight
  is a route change only) but is not a route destination. That is what istiod pushes to Envoy for a
  VirtualService whose route lists it (it drops 0-weighted clusters when others are left), so the
  VirtualService leaves it out too and says what the proxies do.
- **The app's own timeout to the next stage** is the hop's route timeout plus `APP_TIMEOUT_MARGIN_S`, in
  both meshes: the caller's sidecar always answers a timeout first (its 504, counted by its outlier
  detection and retried by its policy), and the app's timeout is only a backstop for a sidecar that hangs.
  Equal timeouts would race, and which one answered would depend on where the pipeline runs.
- **Identities** (`Identity`: principal and SPIFFE id) are derived once per workload here; the local CA's
  certificates, the sidecars' RBAC and SAN checks and Istio's AuthorizationPolicies all read them.

The per-try timeout of a hop into a stage with more than one replica, unless `mesh.yaml` sets one, comes
from the stages' measured latency rather than the whole hop's timeout, so a hung replica costs one short
try and is retried on another: a try into stage S covers S and every stage after it, so it gets
`PER_TRY_LATENCY_FACTOR` times their measured latency (at least S's `retries.per_try_floor_s`), plus the
per-try timeout of the hop after it, so that a hang further down is retried there before this hop gives up. Into a
stage with one replica a try may take the hop's whole timeout: a retry could only reach the same process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from mesh.policy import (
    Autoscale,
    Clients,
    ConnectionPool,
    Fault,
    Gateway,
    OutlierDetection,
    Policy,
    Resources,
    Retries,
    RetryBudget,
    StagePolicy,
    Tracing,
    Version,
    problems_error,
)
from model_export.manifest import Manifest
from stage_service.settings import GATEWAY_HEADER, StageSettings

MIB = 1 << 20
ENVOY_DEFAULT_BUFFER = MIB
GATEWAY = "gateway"  # the caller name of the hop into the first stage
# Per stage, the default overall timeout covers this much time for every stage from it to the end.
DEFAULT_SECONDS_PER_STAGE = 5.0
APP_TIMEOUT_MARGIN_S = 1.0
PER_TRY_LATENCY_FACTOR = 10.0
PER_TRY_FLOOR_S = Retries().per_try_floor_s
# The only paths a caller may reach on the next stage: the v2 inference protocol (health and metrics are
# for the kubelet and Prometheus, which do not pass the inbound authorization).
# REST (KServe v2) and gRPC (inference.GRPCInferenceService, on its own port)
INFERENCE_PATHS = ("/v2", "/v2/*", "/inference.GRPCInferenceService/*")
# What the gateway sets on every request it forwards, over any value a client sent: the first stage then answers
# only for the pipeline (stage_service.settings.GATEWAY_HEADER), where a gRPC call could otherwise name its stage.
GATEWAY_SETS = {GATEWAY_HEADER: "true"}


def gateway_paths(pipeline: str) -> list[str]:
    """The only paths the gateway forwards to the first stage (Istio's form: exact, or a `/*` prefix): the
    pipeline's model and health. `/metrics`, server metadata and each stage's own model stay inside."""
    return [f"/v2/models/{pipeline}", f"/v2/models/{pipeline}/*", "/v2/health/*"]


def model_paths(stage: str) -> list[str]:
    """A stage's own KServe v2 model paths: all a stage's outbound listener forwards to it (the local mesh)."""
    return [f"/v2/models/{stage}", f"/v2/models/{stage}/*"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Identity(_Frozen):
    """A workload's identity: its service account in its namespace."""

    namespace: str
    service_account: str

    @property
    def principal(self) -> str:
        """Istio's form: `cluster.local/ns/<namespace>/sa/<service account>`."""
        return f"cluster.local/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def spiffe_id(self) -> str:
        """The URI SAN of the workload's certificate: `spiffe://` + principal."""
        return f"spiffe://{self.principal}"


class Destination(_Frozen):
    """One version the route sends traffic to, and its share."""

    version: str
    weight: int


class Route(_Frozen):
    """The caller's route into the callee (Istio: the VirtualService's http route)."""

    timeout_s: float
    attempts: int  # retries after the first try; 0: no retry policy at all
    per_try_timeout_s: float
    retry_on: list[str]  # Envoy's conditions, `retriable-status-codes` included where codes are given
    retriable_status_codes: list[int]
    destinations: list[Destination]  # versions with weight > 0 (see the module's docstring)
    fault: Fault | None

    @property
    def istio_retry_on(self) -> str:
        """`retryOn` as Istio reads it: conditions and bare status codes, comma-separated."""
        return ",".join([*self.retry_on, *(str(c) for c in self.retriable_status_codes)])


class Upstream(_Frozen):
    """The caller's cluster(s) of the callee (Istio: the DestinationRule), one subset per version."""

    subsets: list[str]  # every deployed version, weight 0 included
    connection_pool: ConnectionPool
    outlier_detection: OutlierDetection
    retry_budget: RetryBudget | None
    buffer_limit_bytes: int
    expected_san: str  # the callee's SPIFFE id, checked on its certificate (Istio: ISTIO_MUTUAL)


class Hop(_Frozen):
    """One caller → callee hop: everything both meshes configure for it."""

    caller: str  # the previous stage's name, or GATEWAY
    callee: str
    caller_identity: Identity
    callee_identity: Identity
    route: Route
    upstream: Upstream
    allowed_principals: list[str]  # the callee's inbound authorization: who may call it
    allowed_paths: list[str]  # ... and on which request paths (Istio's form: exact, or a `/*` prefix)
    # ... and only with these request headers: the gateway's mark (GATEWAY_SETS) on the first stage, so a route
    # of the shared ingress gateway other than the pipeline's reaches it only by setting the mark on purpose.
    required_headers: dict[str, str] = {}


class StagePlan(_Frozen):
    """What runs for one stage: its versions and replicas, and what each replica is given."""

    name: str
    index: int
    identity: Identity
    replicas: int
    versions: list[Version]
    threads: int
    activation_bytes: int  # bytes per sample of the request body into this stage (binary tensors)
    autoscale: Autoscale
    cpu_millicores: int
    memory_mib: int
    next_timeout_s: float | None  # the app's own timeout on the hop to the next stage; None: the last stage


@dataclass(frozen=True)
class Placement:
    """Where one replica runs: what differs between the local mesh and a pod."""

    manifest: str  # pipeline.json as the process sees it
    model_dir: Path  # the directory a version's replacement file is read from
    host: str
    port: int | None  # None: the app listens on `uds` only
    next_url: str | None  # how the app reaches the next stage: its sidecar's outbound listener, or the Service
    grpc_port: int | None = None  # the app's KServe v2 gRPC port (STAGE_GRPC_PORT); None: no gRPC (or `grpc_uds`)
    # The local mesh: the app's REST and gRPC listeners, and the way to its sidecar's outbound listener, as Unix
    # sockets in a directory only the mesh's user opens (mesh.sockets); a pod keeps TCP (its netns is the bound).
    uds: str | None = None
    grpc_uds: str | None = None
    next_uds: str | None = None


class _Given(StageSettings):
    """StageSettings exactly as given: never read from the environment of the process that plans."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class ClientLimits(_Frozen):
    """`Clients` with every value concrete: what the gateway's and every sidecar's connection manager enforce."""

    request_headers_timeout_s: float
    stream_idle_timeout_s: float
    max_request_headers_kb: int
    max_headers_count: int


class Plan(_Frozen):
    pipeline: str
    namespace: str
    gateway: Gateway
    gateway_identity: Identity
    stages: list[StagePlan]
    hops: list[Hop]  # hops[i] goes into stages[i]
    tracing: Tracing
    clients: ClientLimits

    @property
    def gateway_paths(self) -> list[str]:
        return gateway_paths(self.pipeline)

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def hop_into(self, stage: str) -> Hop:
        return self.hops[self.stage(stage).index]

    def hop_from(self, stage: str) -> Hop | None:
        """The hop this stage calls, or None for the last stage."""
        index = self.stage(stage).index + 1
        return self.hops[index] if index < len(self.hops) else None

    def identities(self) -> dict[str, Identity]:
        """Every workload's identity by name: the gateway's and each stage's."""
        return {GATEWAY: self.gateway_identity, **{s.name: s.identity for s in self.stages}}

    def settings(self, stage: StagePlan, version: Version, placement: Placement,
                 **extra: Any) -> StageSettings:
        """The settings of one replica of `version` of `stage` placed at `placement` (`extra`: more fields)."""
        values: dict[str, Any] = {"manifest": placement.manifest, "name": stage.name, "version": version.name,
                                     "host": placement.host, "threads": stage.threads}
        if placement.port is not None:
            values["port"] = placement.port
        if stage.next_timeout_s is not None:
            values["next_url"] = placement.next_url
            values["timeout_s"] = stage.next_timeout_s
        if version.file is not None:
            values["file"] = placement.model_dir / version.file
        if placement.grpc_port is not None:
            values["grpc_port"] = placement.grpc_port
        for field in ("uds", "grpc_uds"):
            if getattr(placement, field) is not None:
                values[field] = getattr(placement, field)
        if stage.next_timeout_s is not None and placement.next_uds is not None:
            values["next_uds"] = placement.next_uds
        return _Given.model_validate({**values, **extra})


def _pick(*values):  # type: ignore[no-untyped-def]
    return next(v for v in values if v is not None)


def _default_buffer(activation_bytes: int) -> int:
    """Room for a retried body of the largest batch we expect plus headers, never below Envoy's 1 MiB."""
    need = 2 * activation_bytes + 64 * 1024
    size = ENVOY_DEFAULT_BUFFER
    while size < need:
        size *= 2
    return size


def _default_memory_mib(param_bytes: int) -> int:
    """Weights loaded by onnxruntime plus its arena and the Python runtime, in 64 MiB steps."""
    need = 256 * MIB + 3 * param_bytes
    return -(-need // (64 * MIB)) * 64


def derived_per_try_timeouts(manifest: Manifest, floors: list[float] | None = None) -> list[float]:
    """Per stage, the per-try timeout of the hop into it when the policy sets none (module docstring);
    `floors`: per stage, its `retries.per_try_floor_s` (default `PER_TRY_FLOOR_S` each)."""
    floors = floors or [PER_TRY_FLOOR_S] * len(manifest.stages)
    out: list[float] = []
    inner = 0.0
    for i in reversed(range(len(manifest.stages))):
        work_s = PER_TRY_LATENCY_FACTOR * sum(s.cost.latency_ms for s in manifest.stages[i:]) / 1000
        inner = round(max(floors[i], work_s) + inner, 3)
        out.append(inner)
    return out[::-1]


def _route(retries: Retries, timeout_s: float, per_try_s: float, versions: list[Version],
           fault: Fault | None) -> Route:
    codes = [int(v) for v in retries.retry_on if v.isdigit()]
    conditions = [v for v in retries.retry_on if not v.isdigit()]
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return Route(timeout_s=timeout_s, attempts=retries.attempts, per_try_timeout_s=per_try_s, retry_on=conditions,
                 retriable_status_codes=codes,
                 destinations=[Destination(version=v.name, weight=v.weight) for v in versions if v.weight > 0],
                 fault=fault)


def _stage_problems(name: str, retries: Retries, timeout: float, per_try: float, buffer: int,
                    activation: int) -> list[str]:
    problems = []
    if per_try > timeout:
        problems.append(f"stages.{name}: per_try_timeout_s {per_try} exceeds its timeout_s {timeout}")
    if retries.attempts > 0 and buffer < activation:
        problems.append(
            f"stages.{name}: buffer_limit_bytes {buffer} is smaller than its largest activation "
            f"({activation} bytes per sample); Envoy would not retry such requests. "
            f"Raise it to at least {activation} or set retries.attempts to 0"
        )
    return problems


def resolve(policy: Policy, manifest: Manifest) -> Plan:
    """Apply the policy to the pipeline; raise PolicyError naming every problem found."""
    known = [s.name for s in manifest.stages]
    problems = [f"stages.{name}: unknown stage; the pipeline {manifest.name!r} has {known}"
                for name in policy.stages if name not in known]
    n = len(manifest.stages)
    derived_per_try = derived_per_try_timeouts(manifest, [
        _pick(policy.stages.get(s.name, StagePolicy()).retries, policy.defaults.retries, Retries()).per_try_floor_s
        for s in manifest.stages])
    gateway_identity = Identity(namespace=policy.gateway.namespace, service_account=policy.gateway.service_account)
    stages: list[StagePlan] = []
    hops: list[Hop] = []
    caller, caller_identity = GATEWAY, gateway_identity
    for i, stage in enumerate(manifest.stages):
        own, d = policy.stages.get(stage.name, StagePolicy()), policy.defaults
        retries = _pick(own.retries, d.retries, Retries())
        # `defaults.timeout_s` is seconds per stage, for it and each stage after it (as the built-in 5 s is),
        # so one value fits any split; a stage's own `timeout_s` is its whole hop's.
        timeout = _pick(own.timeout_s, (d.timeout_s or DEFAULT_SECONDS_PER_STAGE) * (n - i))
        versions = _pick(own.versions, [Version(name=stage.version, weight=100)])
        replicas = _pick(own.replicas, d.replicas, 1)
        # Only where a retry can reach another replica: with one, a retry after a cut try lands on the same
        # slow or hung process, and every cut try is work done again (measured: under overload, cutting tries
        # at every hop turned slow answers into failures that outlived the overload).
        spare = replicas * len([v for v in versions if v.weight > 0]) > 1
        per_try = _pick(retries.per_try_timeout_s, min(derived_per_try[i], timeout) if spare else timeout)
        activation = sum(t.bytes_per_sample() for t in stage.inputs)
        buffer = _pick(own.buffer_limit_bytes, d.buffer_limit_bytes, _default_buffer(activation))
        threads = _pick(own.threads, d.threads, manifest.profile.threads)
        resources = _pick(own.resources, d.resources, Resources())
        identity = Identity(namespace=policy.namespace, service_account=stage.name)
        problems += _stage_problems(stage.name, retries, timeout, per_try, buffer, activation)
        hops.append(Hop(
            caller=caller, callee=stage.name, caller_identity=caller_identity, callee_identity=identity,
            route=_route(retries, timeout, per_try, versions, own.fault or d.fault),
            upstream=Upstream(
                subsets=[v.name for v in versions],
                connection_pool=_pick(own.connection_pool, d.connection_pool, ConnectionPool()),
                outlier_detection=_pick(own.outlier_detection, d.outlier_detection, OutlierDetection()),
                retry_budget=own.retry_budget or d.retry_budget,
                buffer_limit_bytes=buffer, expected_san=identity.spiffe_id),
            allowed_principals=[caller_identity.principal], allowed_paths=list(INFERENCE_PATHS),
            required_headers=dict(GATEWAY_SETS) if caller == GATEWAY else {},
        ))
        stages.append(StagePlan(
            name=stage.name, index=i, identity=identity, replicas=replicas,
            versions=versions, threads=threads, activation_bytes=activation,
            autoscale=_pick(own.autoscale, d.autoscale, Autoscale()),
            cpu_millicores=_pick(resources.cpu_millicores, 1000 * threads),
            memory_mib=_pick(resources.memory_mib, _default_memory_mib(stage.cost.param_bytes)),
            next_timeout_s=None,
        ))
        caller, caller_identity = stage.name, identity
    for outer, inner in zip(hops, hops[1:], strict=False):
        if inner.route.timeout_s >= outer.route.timeout_s:
            problems.append(
                f"stages.{inner.callee}.timeout_s: timeouts must shrink along the chain: {outer.callee} has "
                f"{outer.route.timeout_s}s but the later {inner.callee} has {inner.route.timeout_s}s; an outer hop's "
                "timeout must cover the hops inside it"
            )
    clients = _client_limits(policy.clients, hops[0].route.timeout_s)
    if clients.stream_idle_timeout_s <= hops[0].route.timeout_s:
        problems.append(f"clients.stream_idle_timeout_s: {clients.stream_idle_timeout_s} must exceed the gateway "
                        f"hop's timeout_s {hops[0].route.timeout_s}: a slow answer would be cut before its timeout")
    if problems:
        raise problems_error(policy, problems)
    stages = [s.model_copy(update={"next_timeout_s": hops[s.index + 1].route.timeout_s + APP_TIMEOUT_MARGIN_S})
              if s.index + 1 < n else s for s in stages]
    return Plan(pipeline=manifest.name, namespace=policy.namespace, gateway=policy.gateway,
                gateway_identity=gateway_identity, stages=stages, hops=hops, tracing=policy.tracing, clients=clients)


def _client_limits(given: Clients, gateway_timeout_s: float) -> ClientLimits:
    idle = _pick(given.stream_idle_timeout_s, gateway_timeout_s + APP_TIMEOUT_MARGIN_S)
    return ClientLimits(request_headers_timeout_s=given.request_headers_timeout_s, stream_idle_timeout_s=idle,
                        max_request_headers_kb=given.max_request_headers_kb,
                        max_headers_count=given.max_headers_count)
