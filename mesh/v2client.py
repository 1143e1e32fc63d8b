"""A minimal KServe v2 REST client (binary tensor extension and JSON), for readiness probes and the demo.

Standard v2 clients work against the gateway unchanged; this one exists so the mesh needs no client
library and can probe the whole chain with one request. The codec is the stage service's own.
"""

from __future__ import annotations

import httpx
import numpy as np

from model_export.manifest import DATATYPE_TO_NUMPY, TensorSpec
from stage_service.chain import TIMING_HEADER
from stage_service.protocol import HEADER_LENGTH, decode_response, request_body

STAGE_TIMING = TIMING_HEADER  # re-exported: the demo and tests read it from here


def zeros(specs: list[TensorSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """A batch of zeros for each tensor, dynamic dimensions other than the batch taken as 1."""
    out = {}
    for t in specs:
        shape = [batch] + [max(d, 1) for d in t.shape[1:]]
        out[t.name] = np.zeros(shape, dtype=DATATYPE_TO_NUMPY[t.datatype])
    return out


def encode(inputs: dict[str, np.ndarray], binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request (the stage service's own codec)."""
    return request_body(inputs, binary)


def decode(response: httpx.Response) -> dict[str, np.ndarray]:
    """Output tensors of an infer response, JSON or binary."""
    return decode_response(response.content, response.headers.get(HEADER_LENGTH))[1]


def infer(client: httpx.Client, base_url: str, model: str, inputs: dict[str, np.ndarray],
          binary: bool = True, headers: dict[str, str] | None = None,
          server_name: str | None = None) -> tuple[dict[str, np.ndarray], httpx.Response]:
    """POST one infer request (with `headers` added; over TLS, `server_name` as the SNI where it is not the URL's
    host, as an Istio HTTPS gateway picks its server by it); raise httpx.HTTPStatusError (with the server's
    message) on a non-2xx."""
    body, codec_headers = encode(inputs, binary)
    response = client.post(f"{base_url}/v2/models/{model}/infer", content=body,
                           headers={**(headers or {}), **codec_headers},
                           extensions={"sni_hostname": server_name} if server_name else None)
    if response.status_code >= 300:
        raise httpx.HTTPStatusError(
            f"{response.status_code} from {model}: {response.text[:500]}", request=response.request, response=response
        )
    return decode(response), response


def stage_timing(header: str | None) -> list[tuple[str, str, float]]:
    """`x-stage-timing: <stage>/<version>=<ms>,...` as (stage, version, ms), in chain order (a pinned request's
    `<version>@<split>` as its version alone: `timing_splits` reads the splits)."""
    out = []
    for item in (header or "").split(","):
        if "=" not in item:
            continue
        who, ms = item.strip().split("=", 1)
        stage, _, version = who.partition("/")
        out.append((stage, version.partition("@")[0], float(ms)))
    return out


def timing_splits(header: str | None) -> list[str | None]:
    """The split that served each stage of a pinned request (`<stage>/<version>@<split>=<ms>`), in chain
    order; None for an entry that names none (a request no gateway pinned)."""
    out: list[str | None] = []
    for item in (header or "").split(","):
        if "=" not in item:
            continue
        _, at, split = item.split("=", 1)[0].strip().partition("@")
        out.append(split if at else None)
    return out
