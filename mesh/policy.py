"""The traffic policy, `mesh.yaml`: the one place a user sets policy for the local mesh and for Istio.

`load_policy` reads and validates the file alone; `resolve` joins it with the manifest and returns a
`ResolvedPolicy` in which every value is concrete and every cross-check (weights, shrinking timeouts,
buffer limits against activations, unknown stages) has passed. The local mesh and the renderer read only
the resolved form, so neither re-derives a default.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_export.manifest import DNS_LABEL, Manifest

MIB = 1 << 20
ENVOY_DEFAULT_BUFFER = MIB
# Envoy's retry_on values for HTTP; bare status codes become retriable_status_codes.
RETRY_ON = {
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "envoy-ratelimited",
    "http3-post-connect-failure",
}
# Per stage, the default overall timeout covers this much time for every stage from it to the end.
DEFAULT_SECONDS_PER_STAGE = 5.0


class PolicyError(ValueError):
    """The policy is invalid, or does not fit the pipeline it is applied to."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Version(_Strict):
    """One version of a stage, and the share of traffic it gets."""

    name: str = "v1"
    weight: int = Field(default=100, ge=0, le=100)
    # A replacement ONNX file for this version (a retrained stage); default: the manifest's file.
    file: str | None = None

    @field_validator("name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"version {value!r} must be a DNS label such as v2")
        return value


class Retries(_Strict):
    attempts: int = Field(default=3, ge=0, le=10)
    per_try_timeout_s: float | None = Field(default=None, gt=0)
    retry_on: list[str] = Field(default_factory=lambda: ["connect-failure", "refused-stream", "reset", "503"])

    @field_validator("retry_on")
    @classmethod
    def _known(cls, values: list[str]) -> list[str]:
        for v in values:
            if v not in RETRY_ON and not (v.isdigit() and 400 <= int(v) <= 599):
                raise ValueError(f"unknown retry_on {v!r}; expected one of {sorted(RETRY_ON)} or a 4xx/5xx code")
        return values


class OutlierDetection(_Strict):
    consecutive_5xx: int = Field(default=3, ge=1)
    interval_s: float = Field(default=1.0, gt=0)
    base_ejection_time_s: float = Field(default=30.0, gt=0)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class ConnectionPool(_Strict):
    max_connections: int = Field(default=1024, ge=1)
    max_pending_requests: int = Field(default=1024, ge=1)
    max_requests: int = Field(default=1024, ge=1)


class Autoscale(_Strict):
    """Horizontal pod autoscaling of a stage on Kubernetes (the `prod` overlay's HorizontalPodAutoscaler)."""

    min_replicas: int = Field(default=2, ge=1, le=64)
    max_replicas: int = Field(default=6, ge=1, le=256)
    target_cpu_percent: int = Field(default=70, ge=1, le=100)

    @model_validator(mode="after")
    def _range(self) -> Autoscale:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class Resources(_Strict):
    """CPU and memory of a stage's container on Kubernetes; requests equal limits (Guaranteed QoS)."""

    cpu_millicores: int | None = Field(default=None, ge=100)  # default: 1000 per inference thread
    memory_mib: int | None = Field(default=None, ge=64)  # default: from the stage's parameter bytes


class Tracing(_Strict):
    """Distributed tracing: the share of requests sampled (Istio Telemetry) and where the stage services send
    their spans in the cluster (OTLP over HTTP; default: the collector of Istio's Jaeger addon; null: none)."""

    sampling_percent: float = Field(default=100.0, ge=0, le=100)
    otlp_endpoint: str | None = "http://jaeger-collector.istio-system.svc.cluster.local:4318"


class StagePolicy(_Strict):
    """Policy for calls into one stage. Unset fields take the `defaults` block's value, then the default."""

    replicas: int | None = Field(default=None, ge=1, le=64)
    versions: list[Version] | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retries: Retries | None = None
    outlier_detection: OutlierDetection | None = None
    connection_pool: ConnectionPool | None = None
    buffer_limit_bytes: int | None = Field(default=None, ge=16 * 1024)
    threads: int | None = Field(default=None, ge=1, le=64)
    autoscale: Autoscale | None = None
    resources: Resources | None = None

    @field_validator("versions")
    @classmethod
    def _versions(cls, versions: list[Version] | None) -> list[Version] | None:
        if versions is None:
            return None
        if not versions:
            raise ValueError("versions must list at least one version")
        names = [v.name for v in versions]
        if len(set(names)) != len(names):
            raise ValueError(f"version names must be unique, got {names}")
        total = sum(v.weight for v in versions)
        if total != 100:
            raise ValueError(f"version weights must sum to 100, got {total} ({names})")
        return versions


class Gateway(_Strict):
    host: str = "pipeline.local"
    port: int = Field(default=8080, ge=1, le=65535)
    # The gateway's own workload identity, the only caller the first stage admits. The defaults are those
    # of Istio's stock ingress gateway, so the same principal holds in the cluster and in the local mesh.
    namespace: str = "istio-system"
    service_account: str = "istio-ingressgateway-service-account"

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"{value!r} must be a DNS label")
        return value


class Policy(_Strict):
    """`mesh.yaml`."""

    namespace: str = "pipeline"
    gateway: Gateway = Field(default_factory=Gateway)
    defaults: StagePolicy = Field(default_factory=StagePolicy)
    stages: dict[str, StagePolicy] = Field(default_factory=dict)
    tracing: Tracing = Field(default_factory=Tracing)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(f"namespace {value!r} must be a DNS label")
        return value

    @model_validator(mode="after")
    def _defaults_have_no_versions(self) -> Policy:
        if self.defaults.versions is not None:
            raise ValueError("defaults.versions is not allowed: versions belong to one stage")
        return self


class ResolvedStage(_Strict):
    """A stage's effective policy: every value concrete."""

    name: str
    index: int
    replicas: int
    versions: list[Version]
    timeout_s: float
    retries: Retries
    per_try_timeout_s: float
    outlier_detection: OutlierDetection
    connection_pool: ConnectionPool
    buffer_limit_bytes: int
    threads: int
    activation_bytes: int  # bytes per sample of the request body into this stage (binary tensors)
    autoscale: Autoscale = Field(default_factory=Autoscale)
    cpu_millicores: int = 1000
    memory_mib: int = 512


class ResolvedPolicy(_Strict):
    namespace: str
    gateway: Gateway
    stages: list[ResolvedStage]
    tracing: Tracing = Field(default_factory=Tracing)

    def stage(self, name: str) -> ResolvedStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def spiffe_id(self, service_account: str) -> str:
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{service_account}"

    def principal(self, service_account: str) -> str:
        return f"cluster.local/ns/{self.namespace}/sa/{service_account}"

    def gateway_principal(self) -> str:
        """Istio principal of the ingress gateway (`cluster.local/ns/istio-system/sa/...` by default)."""
        return f"cluster.local/ns/{self.gateway.namespace}/sa/{self.gateway.service_account}"

    def gateway_spiffe_id(self) -> str:
        return f"spiffe://{self.gateway_principal()}"

    def caller_principal(self, name: str) -> str:
        """The one principal allowed to call stage `name`: the previous stage's, or the gateway's."""
        index = self.stage(name).index
        return self.gateway_principal() if index == 0 else self.principal(self.stages[index - 1].name)


def load_policy(path: Path | str | None) -> Policy:
    """Read `mesh.yaml`; None gives the defaults, so the mesh runs with no file at all."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping at the top (namespace, gateway, defaults, stages)")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{path}: invalid policy:\n{exc}") from exc


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


def resolve(policy: Policy, manifest: Manifest) -> ResolvedPolicy:
    """Apply the policy to the pipeline; raise PolicyError naming every problem found."""
    known = [s.name for s in manifest.stages]
    problems = [
        f"stages.{name}: unknown stage; the pipeline {manifest.name!r} has {known}"
        for name in policy.stages
        if name not in known
    ]
    n = len(manifest.stages)
    resolved: list[ResolvedStage] = []
    for i, stage in enumerate(manifest.stages):
        own = policy.stages.get(stage.name, StagePolicy())
        d = policy.defaults
        retries = _pick(own.retries, d.retries, Retries())
        timeout = _pick(own.timeout_s, d.timeout_s, DEFAULT_SECONDS_PER_STAGE * (n - i))
        per_try = _pick(retries.per_try_timeout_s, timeout)
        activation = sum(t.bytes_per_sample() for t in stage.inputs)
        buffer = _pick(own.buffer_limit_bytes, d.buffer_limit_bytes, _default_buffer(activation))
        threads = _pick(own.threads, d.threads, manifest.profile.threads)
        resources = _pick(own.resources, d.resources, Resources())
        resolved.append(
            ResolvedStage(
                name=stage.name,
                index=i,
                replicas=_pick(own.replicas, d.replicas, 1),
                versions=_pick(own.versions, [Version(name=stage.version, weight=100)]),
                timeout_s=timeout,
                retries=retries,
                per_try_timeout_s=per_try,
                outlier_detection=_pick(own.outlier_detection, d.outlier_detection, OutlierDetection()),
                connection_pool=_pick(own.connection_pool, d.connection_pool, ConnectionPool()),
                buffer_limit_bytes=buffer,
                threads=threads,
                activation_bytes=activation,
                autoscale=_pick(own.autoscale, d.autoscale, Autoscale()),
                cpu_millicores=_pick(resources.cpu_millicores, 1000 * threads),
                memory_mib=_pick(resources.memory_mib, _default_memory_mib(stage.cost.param_bytes)),
            )
        )
        if per_try > timeout:
            problems.append(
                f"stages.{stage.name}: per_try_timeout_s {per_try} exceeds its timeout_s {timeout}"
            )
        if retries.attempts > 0 and buffer < activation:
            problems.append(
                f"stages.{stage.name}: buffer_limit_bytes {buffer} is smaller than its largest activation "
                f"({activation} bytes per sample); Envoy would not retry such requests. "
                f"Raise it to at least {activation} or set retries.attempts to 0"
            )
    for outer, inner in zip(resolved, resolved[1:], strict=False):
        if inner.timeout_s >= outer.timeout_s:
            problems.append(
                f"timeouts must shrink along the chain: {outer.name} has {outer.timeout_s}s but the later "
                f"{inner.name} has {inner.timeout_s}s; an outer hop's timeout must cover the hops inside it"
            )
    if problems:
        raise PolicyError("invalid policy for this pipeline:\n  - " + "\n  - ".join(problems))
    return ResolvedPolicy(namespace=policy.namespace, gateway=policy.gateway, stages=resolved, tracing=policy.tracing)
