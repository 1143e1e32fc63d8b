"""The traffic policy, `mesh.yaml`: the one place a user sets policy for the local mesh and for Istio.

`load_policy` reads and validates the file alone. `mesh.plan.resolve` joins it with the manifest into the
plan of hops that both meshes are written from; nothing else reads a `Policy`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mesh import policy_errors
from model_export.manifest import DnsLabel

# Envoy's retry_on values for HTTP; bare status codes become retriable_status_codes.
RETRY_ON = {
    "5xx",
    "unavailable",
    "cancelled",
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


class PolicyError(ValueError):
    """The policy is invalid, or does not fit the pipeline it is applied to."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Version(_Strict):
    """One version of a stage, and the share of traffic it gets."""

    name: DnsLabel = "v1"
    weight: int = Field(default=100, ge=0, le=100)
    # A replacement ONNX file for this version (a retrained stage); default: the manifest's file.
    file: str | None = None


# Istio's default conditions (what a VirtualService without `retries` gets: connect-failure, refused-stream,
# unavailable, cancelled and status 503), plus `reset`: a replica that hangs past the per-try timeout or
# dies mid-request is retried on another one. `unavailable`/`cancelled` are gRPC statuses; they never fire
# on this HTTP/1.1 chain and are kept so the conditions read like Istio's.
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "reset", "503")


class Retries(_Strict):
    attempts: int = Field(default=3, ge=0, le=10)
    # Default: derived from the stages' measured latency (mesh.plan.derived_per_try_timeouts), never over
    # timeout_s: 10x the latency of the stages a try covers, at least `per_try_floor_s`, plus the next hop's.
    per_try_timeout_s: float | None = Field(default=None, gt=0)
    # The least a derived try into this stage may take for its own stages: what a loaded machine adds to a
    # fast stage's latency. Every try cut and retried is work done again, so too low a floor turns an
    # overloaded chain's slow answers into failures; too high, and each request a hung replica draws waits it.
    per_try_floor_s: float = Field(default=0.5, gt=0)
    retry_on: list[str] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))

    @field_validator("retry_on")
    @classmethod
    def _known(cls, values: list[str]) -> list[str]:
        for v in values:
            if v not in RETRY_ON and not (v.isdigit() and 400 <= int(v) <= 599):
                raise ValueError(f"unknown retry_on {v!r}; expected one of {sorted(RETRY_ON)} or a 4xx/5xx code")
        return values


class RetryBudget(_Strict):
    """Retries outstanding at once, as a share of the requests outstanding (Envoy's retry budget, Istio's
    `trafficPolicy.retryBudget`): bounds the extra load retries add to an overloaded stage. Off by default:
    with few replicas, one failing replica needs the retries of its whole share at once (half the requests
    of two replicas), which a budget of Istio's default 20% refuses (measured: a frozen replica of two then
    lost requests to budget overflow)."""

    percent: float = Field(default=20.0, ge=0, le=100)
    min_retry_concurrency: int = Field(default=3, ge=0)


class OutlierDetection(_Strict):
    """Ejection of a replica that keeps failing. With `split_external_local_origin_errors`, failures the
    caller's proxy sees itself (connect failures, resets, per-try timeouts: a hung replica) count apart from
    the 5xx answers the replica sends, so a replica that hangs is ejected as fast as one that answers 503.

    One local-origin failure ejects by default: a frozen replica keeps drawing a share of the requests until
    it is ejected (least-request balancing still picks it when both of its two random picks land on it), and
    each of those waits out a connect or per-try timeout; ejection happens on the failure itself, not at the
    next `interval`. `max_ejection_percent` below 100 keeps the last replica of a version in: Envoy ejects
    a host only while the ejected share stays within it (one of two at 50%, never the only one)."""

    consecutive_5xx: int = Field(default=3, ge=0)
    consecutive_gateway_errors: int = Field(default=3, ge=0)  # 502, 503, 504; 0: off
    consecutive_local_origin_failures: int = Field(default=1, ge=0)  # counted only when split; 0: off
    split_external_local_origin_errors: bool = True
    interval_s: float = Field(default=1.0, gt=0)
    base_ejection_time_s: float = Field(default=30.0, gt=0)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class ConnectionPool(_Strict):
    max_connections: int = Field(default=1024, ge=1)
    max_pending_requests: int = Field(default=1024, ge=1)
    max_requests: int = Field(default=1024, ge=1)
    # Retries outstanding at once. Envoy's default of 3 would turn a replica's death under load into
    # overflow errors; Istio lifts it (to 2^32-1), this keeps it bounded like the other limits.
    max_retries: int = Field(default=1024, ge=1)
    # A frozen replica still completes the TCP handshake in the kernel; only the TLS handshake hangs, and a
    # request waiting for a new connection to it waits this long (measured: most of a freeze's tail at 1 s).
    # A sidecar-to-sidecar handshake takes milliseconds even on a loaded machine; a timed-out one is retried.
    connect_timeout_s: float = Field(default=0.25, gt=0, le=60)
    # A connection to a replica idle this long is closed (Istio's `http.idleTimeout`). Kept-alive connections
    # are where a frozen replica's first requests wait out a whole per-try timeout: one per connection left
    # from the last burst (measured: 7 after a loaded minute, each 1 s), so only recently used ones are kept.
    idle_timeout_s: float = Field(default=1.0, gt=0, le=3600)


class Delay(_Strict):
    percent: float = Field(default=100.0, ge=0, le=100)
    fixed_delay_s: float = Field(gt=0, le=3600)


class Abort(_Strict):
    percent: float = Field(default=100.0, ge=0, le=100)
    http_status: int = Field(ge=200, le=599)


class Fault(_Strict):
    """Fault injection on the hop into a stage (Istio's HTTPFaultInjection): the caller's proxy delays or
    answers a share of the requests itself. For chaos tests; never in a production policy."""

    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _something(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("fault needs a delay, an abort or both")
        return self


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
    # In a stage's block: its hop's timeout. In `defaults`: seconds per stage, for it and every stage after it.
    timeout_s: float | None = Field(default=None, gt=0)
    retries: Retries | None = None
    outlier_detection: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None
    connection_pool: ConnectionPool | None = None
    buffer_limit_bytes: int | None = Field(default=None, ge=16 * 1024)
    threads: int | None = Field(default=None, ge=1, le=64)
    autoscale: Autoscale | None = None
    resources: Resources | None = None
    fault: Fault | None = None

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


class GatewayAuth(_Strict):
    """Who may call the pipeline through the gateway: clients presenting a JWT of this issuer for one of these
    audiences (Istio: a RequestAuthentication and an AuthorizationPolicy on the ingress gateway; locally: Envoy's
    jwt_authn filter over the JWKS `mesh up` creates, whose tokens `python -m mesh token` mints). Health stays open,
    as the ingress gateway's own probes are."""

    enabled: bool = True
    issuer: str = Field(default="https://meshpipe.local", min_length=1)
    audiences: list[str] = Field(default_factory=lambda: ["pipeline"])
    # In the cluster, where the issuer publishes its keys (Istio's jwksUri), or the key set itself as JSON
    # (Istio's jwks). Neither: istiod finds them by OpenID discovery (`<issuer>/.well-known/openid-configuration`).
    # The local mesh always checks tokens against the key set `mesh up` made.
    jwks_uri: str | None = None
    jwks: str | None = None

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, values: list[str]) -> list[str]:
        if not values or any(not v for v in values):
            raise ValueError(f"audiences must list at least one non-empty audience, got {values}")
        return values

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _url_or_name(cls, value: str | None) -> str | None:
        if value is not None and any(c.isspace() for c in value):
            raise ValueError(f"{value!r} contains whitespace")
        return value

    @field_validator("jwks_uri")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
            raise ValueError(f"{value!r} is not an http(s) URL such as https://issuer.example/.well-known/jwks.json")
        return value

    @field_validator("jwks")
    @classmethod
    def _key_set(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            keys = json.loads(value).get("keys")
        except (ValueError, AttributeError):
            keys = None
        if not isinstance(keys, list) or not keys:
            raise ValueError('jwks must be a JSON Web Key Set: {"keys": [...]} with at least one key')
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> GatewayAuth:
        if self.jwks is not None and self.jwks_uri is not None:
            raise ValueError("set jwks_uri or jwks, not both")
        return self


class GatewayTls(_Strict):
    """TLS at the gateway. Istio: an HTTPS server (443, mode SIMPLE) whose certificate and key are the Kubernetes
    Secret `credential_name` in the gateway's namespace; locally: a server certificate from the mesh's CA
    (plain HTTP only with `mesh up --insecure-gateway`)."""

    credential_name: DnsLabel = "pipeline-gateway-tls"


class Gateway(_Strict):
    host: str = "pipeline.local"
    port: int = Field(default=8080, ge=1, le=65535)
    # The gateway's own workload identity, the only caller the first stage admits. The defaults are those
    # of Istio's stock ingress gateway, so the same principal holds in the cluster and in the local mesh.
    namespace: DnsLabel = "istio-system"
    service_account: DnsLabel = "istio-ingressgateway-service-account"
    auth: GatewayAuth = Field(default_factory=GatewayAuth)
    tls: GatewayTls = Field(default_factory=GatewayTls)


class Clients(_Strict):
    """What a slow or oversized client may hold at the gateway and at every sidecar (Envoy's connection
    manager), the same bounds the stage apps apply themselves (STAGE_HEADER_TIMEOUT_S, STAGE_MAX_HEADER_BYTES):
    a client that trickles its headers is cut off (408) instead of holding a connection forever."""

    request_headers_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    # A stream with no bytes either way for this long is reset. Default: the gateway hop's timeout plus the
    # app's margin, so no request still inside its route timeout is ever cut by it.
    stream_idle_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    max_request_headers_kb: int = Field(default=32, ge=1, le=8192)  # past it 431
    max_headers_count: int = Field(default=100, ge=1, le=10000)  # past it 431


class Split(_Strict):
    """One split of the pipeline's model (its own `pipeline.json`) and the share of new requests it gets.

    With `splits` listed, every request is pinned to one split (`x-pipeline-version`): a request that names
    one goes to it, one that names none is assigned one by these weights at the gateway, and no hop ever
    sends it to a stage of another split. `stages` is this split's per-stage policy, as the top-level
    `stages` is for the pipeline the mesh was started with (that one's entry here leaves `stages` empty)."""

    pipeline: str = Field(min_length=1)  # the split's pipeline directory; relative: to the policy file
    weight: int = Field(default=100, ge=0, le=100)
    stages: dict[str, StagePolicy] = Field(default_factory=dict)


class Policy(_Strict):
    """`mesh.yaml`."""

    # The file and text it was read from (`load_policy`), so that a problem found later, against a pipeline
    # (`plan.resolve`), names its line too.
    _source: tuple[Path, str] | None = PrivateAttr(default=None)

    namespace: DnsLabel = "pipeline"
    gateway: Gateway = Field(default_factory=Gateway)
    defaults: StagePolicy = Field(default_factory=StagePolicy)
    stages: dict[str, StagePolicy] = Field(default_factory=dict)
    tracing: Tracing = Field(default_factory=Tracing)
    clients: Clients = Field(default_factory=Clients)
    splits: list[Split] | None = None  # None: one split, the pipeline the mesh runs, and no pinning

    @model_validator(mode="after")
    def _defaults_have_no_versions(self) -> Policy:
        if self.defaults.versions is not None:
            raise ValueError("defaults.versions is not allowed: versions belong to one stage")
        return self

    @field_validator("splits")
    @classmethod
    def _splits(cls, splits: list[Split] | None) -> list[Split] | None:
        if splits is None:
            return None
        if not splits:
            raise ValueError("splits must list at least one split (or be left out)")
        pipelines = [s.pipeline for s in splits]
        if len(set(pipelines)) != len(pipelines):
            raise ValueError(f"each split's pipeline must be listed once, got {pipelines}")
        total = sum(s.weight for s in splits)
        if total != 100:
            raise ValueError(f"split weights must sum to 100, got {total} ({pipelines})")
        return splits


def load_policy(path: Path | str | None) -> Policy:
    """Read `mesh.yaml`; None gives the defaults, so the mesh runs with no file at all."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(policy_errors.yaml_problem(exc, path)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping at the top (namespace, gateway, defaults, stages)")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(policy_errors.explain(exc, path, text, Policy)) from exc
    policy._source = (path, text)
    return policy


def problems_error(policy: Policy, problems: list[str]) -> PolicyError:
    """Problems found in applying `policy` to a pipeline, each at the line of its file its leading field path
    names (`stages.NAME...: what`), as the file's own field errors are."""
    if policy._source is None:
        return PolicyError("invalid policy for this pipeline:\n  - " + "\n  - ".join(problems))
    path, text = policy._source
    lines = policy_errors.key_lines(text)
    return PolicyError("\n".join(policy_errors.at_line(problem, path, lines) for problem in problems))
