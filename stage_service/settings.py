"""The stage service's settings: one class, read from `STAGE_*` environment variables, failing fast.

Nothing is read at import time; `__main__` builds `StageSettings()` once and tests pass their own.
Checks that need the manifest (the stage exists, the next URL fits its place in the chain, the ONNX
file matches) happen in `runtime.load_stage`, which names the setting at fault too.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model_export.manifest import DnsLabel

ENV_PREFIX = "STAGE_"
# sun_path of a Unix domain socket holds 108 bytes, the last a NUL.
MAX_SOCKET_PATH = 107
_URL = re.compile(r"^https?://[^/\s:]+(:\d{1,5})?(/[^\s]*)?$")

# Set by the mesh's gateway on every request it lets in, overwriting any a client sent: at the first stage such a
# request may name only the pipeline. gRPC carries the model name inside the message, where the gateway's routes
# cannot see it, so this is what keeps the first stage's own name (an internal one) out of clients' reach. (Here,
# with the settings, so the mesh can name it without importing the serving code.)
GATEWAY_HEADER = "x-pipeline-gateway"

# Short names accepted in STAGE_PROVIDERS besides onnxruntime's own.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class StageSettings(BaseSettings):
    """Configuration of one stage process. Every field is `STAGE_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    manifest: Path = Field(description="pipeline.json (or its directory); stage files lie beside it")
    name: str = Field(min_length=1, description="the stage this process serves")
    next_url: str | None = Field(default=None, description="base URL of the next stage; unset on the last")
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=8080, ge=1, le=65535, description="port to listen on")
    grpc_port: int | None = Field(default=None, ge=1, le=65535, description="port of the KServe v2 gRPC endpoint "
                                  "(inference.GRPCInferenceService) beside REST; unset = no gRPC")
    uds: Path | None = Field(default=None, description="listen on this Unix domain socket instead of "
                             "STAGE_HOST:STAGE_PORT (the local mesh: only its sidecar can reach it)")
    grpc_uds: Path | None = Field(default=None, description="the gRPC endpoint on this Unix domain socket instead "
                                  "of STAGE_GRPC_PORT")
    next_uds: Path | None = Field(default=None, description="reach STAGE_NEXT_URL through this Unix domain socket "
                                  "(the local mesh: the sidecar's outbound listener); unset = TCP")
    threads: int = Field(default=1, ge=1, le=256, description="onnxruntime intra-op threads")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="execution providers, comma-separated, in order; 'auto' = CUDA first where present, else CPU",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="timeout of the hop to the next stage")
    max_request_bytes: int = Field(default=64 << 20, ge=1024, description="largest request body accepted")
    max_inflight: int = Field(default=64, ge=1, description="requests being inferred (bodies all arrived) past "
                              "which 503 is answered")
    max_request_batch: int | None = Field(
        default=None, ge=1, description="samples one request may carry; default: the most whose activations, at "
        "this stage and every later one, fit STAGE_MAX_REQUEST_BYTES (from the manifest)")
    max_json_values: int = Field(default=1 << 21, ge=1024, description="JSON values (numbers, lists, objects) a "
                                 "request's JSON may hold (a JSON body, or a binary body's JSON header): parsing "
                                 "takes ~80 bytes of memory each")
    max_header_bytes: int = Field(default=32 << 10, ge=1024, le=16 << 20,
                                  description="request line and headers together; past it 431")
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600,
                                    description="a new connection or request has this long to send its headers")
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                  description="a request's whole body must arrive within this; past it 408")
    max_buffered_bytes: int | None = Field(
        default=None, ge=1024, description="request bodies held in memory at once (arriving, or waiting on their "
        "answer) past which 503; default 4 x STAGE_MAX_REQUEST_BYTES")
    max_connections: int = Field(default=1024, ge=1, description="open connections past which new requests get "
                                 "503 (connections still sending a body hold no STAGE_MAX_INFLIGHT slot)")
    keepalive_timeout_s: int = Field(default=75, ge=1, le=3600, description="idle keep-alive connections are "
                                     "closed after this; above the callers' idle expiry (theirs: 30 s or less)")
    drain_delay_s: float = Field(default=0.0, ge=0, le=600, description="on SIGTERM, answer not-ready but keep "
                                 "serving this long (until the mesh stops sending), then stop listening and "
                                 "finish what is in flight")
    version: DnsLabel | None = Field(default=None, description="version reported; default the manifest's")
    file: Path | None = Field(default=None, description="replacement ONNX file for a canary of this stage")
    prepack: bool | None = Field(default=None, description="let onnxruntime repack weights for its matrix "
                                 "kernels (a private copy of each); default: off where the stage's weights are in "
                                 "an external data file (they stay memory-mapped), on otherwise")
    max_batch_size: int = Field(default=1, ge=1, le=4096,
                                description="dynamic batching: samples merged into one run; 1 = off")
    max_queue_delay_ms: float = Field(default=2.0, ge=0, le=10_000,
                                      description="dynamic batching: longest wait for more requests")
    trace_file: str | None = Field(default=None, description="also append every span as a JSON line here; "
                                   "{stage}, {version} and {pid} are filled in")
    log_level: str = Field(default="info", pattern=r"^(critical|error|warning|info|debug|trace)$",
                           description="critical, error, warning, info, debug or trace")
    access_log: bool = Field(default=False, description="log every request (uvicorn's access log)")

    def to_env(self) -> dict[str, str]:
        """The `STAGE_*` variables that give these settings: every field set explicitly (the others keep
        their defaults), providers by their short names where they have one."""
        short = {full: alias for alias, full in PROVIDER_ALIASES.items()}
        env = {}
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "providers":
                text = ",".join(short.get(p, p) for p in value)
            elif isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, float):
                text = str(int(value)) if value.is_integer() else repr(value)
            else:
                text = str(value)
            env[f"{ENV_PREFIX}{name.upper()}"] = text
        return env

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list):
            if not value:
                raise ValueError("name at least one execution provider, or 'auto'")
            return [PROVIDER_ALIASES.get(str(p).lower(), str(p)) for p in value]
        return value

    @field_validator("max_buffered_bytes")
    @classmethod
    def _buffer_fits_a_request(cls, value: int | None, info: ValidationInfo) -> int | None:
        request = info.data.get("max_request_bytes")
        if value is not None and request is not None and value < request:
            raise ValueError(f"must be at least STAGE_MAX_REQUEST_BYTES ({request}), or no request of that size "
                             "could ever be read")
        return value

    @property
    def buffered_bytes_limit(self) -> int:
        return self.max_buffered_bytes or 4 * self.max_request_bytes

    @field_validator("uds", "grpc_uds", "next_uds")
    @classmethod
    def _socket_path(cls, value: Path | None) -> Path | None:
        if value is None or str(value).strip() == "":
            return None
        if not value.is_absolute():
            raise ValueError(f"{str(value)!r} is not an absolute path to a Unix domain socket")
        if len(os.fsencode(value)) > MAX_SOCKET_PATH:
            raise ValueError(f"a Unix domain socket's path holds at most {MAX_SOCKET_PATH} bytes, this one has "
                             f"{len(os.fsencode(value))}")
        return value

    @model_validator(mode="after")
    def _one_grpc_endpoint(self) -> StageSettings:
        if self.grpc_port is not None and self.grpc_uds is not None:
            raise ValueError("set one of STAGE_GRPC_PORT and STAGE_GRPC_UDS, not both")
        if self.next_uds is not None and self.next_url is None:
            raise ValueError("STAGE_NEXT_UDS needs STAGE_NEXT_URL (the next stage's base URL, sent through the socket)")
        return self

    @property
    def serves_grpc(self) -> bool:
        return self.grpc_port is not None or self.grpc_uds is not None

    @field_validator("next_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip().rstrip("/")
        if not _URL.match(value):
            raise ValueError(f"{value!r} is not an http(s) base URL such as http://stage-1:8080")
        return value


def describe_validation_error(exc: ValidationError) -> str:
    """One line per invalid field, naming the environment variable, e.g. `STAGE_PORT: ...`."""
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a check across fields names its variables itself
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        field = str(err["loc"][0])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A line for each STAGE_* variable that is no setting (a misspelt one is otherwise silently ignored, its
    default used), with the nearest setting's name where one is close."""
    known = [f"{ENV_PREFIX}{name.upper()}" for name in StageSettings.model_fields]
    lines = []
    for variable in sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known):
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.75)
        lines.append(f"{variable}: not a setting" + (f"; did you mean {close[0]}?" if close else
                                                      "; `python -m stage_service --help` lists them"))
    return lines
