"""A minimal KServe v2 REST client (binary tensor extension and JSON), for readiness probes and the demo.

Standard v2 clients work against the gateway unchanged; this one exists so the mesh needs no client
library and can probe the whole chain with one request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np

from model_export.manifest import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
STAGE_TIMING = "x-stage-timing"


def zeros(specs: list[TensorSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """A batch of zeros for each tensor, dynamic dimensions other than the batch taken as 1."""
    out = {}
    for t in specs:
        shape = [batch] + [max(d, 1) for d in t.shape[1:]]
        out[t.name] = np.zeros(shape, dtype=DATATYPE_TO_NUMPY[t.datatype])
    return out


def encode(inputs: dict[str, np.ndarray], binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request; with `binary`, tensors and outputs travel as raw bytes."""
    header: dict[str, Any] = {"inputs": []}
    chunks = []
    for name, array in inputs.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape),
                                 "datatype": NUMPY_TO_DATATYPE[array.dtype.name]}
        if binary:
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        header["inputs"].append(entry)
    if not binary:
        return json.dumps(header).encode(), {"content-type": "application/json"}
    header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def decode(response: httpx.Response) -> dict[str, np.ndarray]:
    """Output tensors of an infer response, JSON or binary."""
    body = response.content
    length = response.headers.get(HEADER_LENGTH)
    head_end = int(length) if length is not None else len(body)
    header = json.loads(body[:head_end])
    offset = head_end
    out = {}
    for t in header["outputs"]:
        dtype = np.dtype(DATATYPE_TO_NUMPY[t["datatype"]])
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(body[offset:offset + size], dtype=dtype)
            offset += size
        else:
            array = np.asarray(t["data"], dtype=dtype)
        out[t["name"]] = array.reshape(t["shape"])
    return out


def infer(client: httpx.Client, base_url: str, model: str, inputs: dict[str, np.ndarray],
          binary: bool = True) -> tuple[dict[str, np.ndarray], httpx.Response]:
    """POST one infer request; raise httpx.HTTPStatusError (with the server's message) on a non-2xx."""
    body, headers = encode(inputs, binary)
    response = client.post(f"{base_url}/v2/models/{model}/infer", content=body, headers=headers)
    if response.status_code >= 300:
        raise httpx.HTTPStatusError(
            f"{response.status_code} from {model}: {response.text[:500]}", request=response.request, response=response
        )
    return decode(response), response


def stage_timing(header: str | None) -> list[tuple[str, str, float]]:
    """`x-stage-timing: <stage>/<version>=<ms>,...` as (stage, version, ms), in chain order."""
    out = []
    for item in (header or "").split(","):
        if "=" not in item:
            continue
        who, ms = item.strip().split("=", 1)
        stage, _, version = who.partition("/")
        out.append((stage, version, float(ms)))
    return out
