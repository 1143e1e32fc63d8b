"""What the load generator sends: a few fixed request bodies for one model, and what each should return.

The tensors come from the model's own v2 metadata (`GET /v2/models/{name}`), so any KServe v2 endpoint
works; with the pipeline's directory, the whole model computes the expected outputs for correctness
sampling.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from model_export.manifest import TensorSpec, load_manifest
from model_export.samples import random_tensors
from stage_service.protocol import decode_response, request_body


class WorkloadError(RuntimeError):
    """The target cannot be load-tested as asked (unreachable, unknown model, mismatched pipeline)."""


@dataclass(frozen=True)
class Body:
    content: bytes
    headers: dict[str, str]
    expected: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Access:
    """How to reach a gateway that asks for TLS and a token: the CA its certificate is checked against (None:
    the system's CAs) and the bearer token sent with every request (None: none)."""

    ca: Path | None = None
    token: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca is not None else True


@dataclass
class Workload:
    url: str
    model: str
    binary: bool
    bodies: list[Body] = field(default_factory=list)
    access: Access = field(default_factory=Access)

    @property
    def infer_url(self) -> str:
        return f"{self.url.rstrip('/')}/v2/models/{self.model}/infer"

    def check(self, body: Body, content: bytes, header_length: str | None, tolerance: float) -> float | None:
        """Max |got - expected| for this response, None when nothing is expected; raises on a bad body."""
        if body.expected is None:
            return None
        _, outputs = decode_response(content, header_length)
        worst = 0.0
        for name, want in body.expected.items():
            got = outputs.get(name)
            if got is None or got.shape != want.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
        return worst


def fetch_inputs(url: str, model: str, timeout: float = 10.0, access: Access | None = None) -> list[TensorSpec]:
    """The model's inputs from its v2 metadata."""
    meta_url = f"{url.rstrip('/')}/v2/models/{model}"
    access = access or Access()
    try:
        with httpx.Client(verify=access.verify(), headers=access.headers, timeout=timeout) as client:
            response = client.get(meta_url)
    except httpx.HTTPError as exc:
        raise WorkloadError(f"{meta_url}: cannot reach the server ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise WorkloadError(f"{meta_url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        return [TensorSpec(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in response.json()["inputs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise WorkloadError(f"{meta_url}: not KServe v2 model metadata ({exc})") from exc


def build(url: str, model: str, binary: bool = True, batch: int = 1, variants: int = 4,
          pipeline: Path | None = None, access: Access | None = None) -> Workload:
    """`variants` distinct request bodies; with `pipeline`, each carries the whole model's expected outputs."""
    access = access or Access()
    specs = fetch_inputs(url, model, access=access)
    whole = None
    if pipeline is not None:
        from model_export.ort_session import create_session
        from model_export.verify import resolve_source

        manifest = load_manifest(pipeline)
        if [t.name for t in manifest.inputs] != [t.name for t in specs]:
            raise WorkloadError(
                f"{pipeline}: the pipeline's inputs {[t.name for t in manifest.inputs]} are not the inputs of "
                f"{model} at {url} ({[t.name for t in specs]})"
            )
        whole = create_session(str(resolve_source(Path(pipeline), manifest, None)), manifest.profile.threads)
    workload = Workload(url, model, binary, access=access)
    for seed in range(variants):
        tensors = random_tensors(specs, batch, seed)
        expected = None
        if whole is not None:
            names = [o.name for o in whole.get_outputs()]
            expected = dict(zip(names, whole.run(names, tensors), strict=True))
        content, headers = request_body(tensors, binary)
        workload.bodies.append(Body(content, headers, expected))
    return workload
