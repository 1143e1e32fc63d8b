"""Hypothesis strategies for bad input to a stage or the gateway, from near-valid to absurd, and a raw-bytes
exchange: shared by the fuzz test (`tests/stage_service/test_fuzz.py`, short) and `make reliability`
(`benchmarks.reliability`, long), so both draw from the same classes.

`requests(binary)` builds a v2 request (JSON header and binary sections) that is right in every field but
one, three times in four (`often`), so near-valid requests reach the deep checks; `raw_requests` is bytes
on a socket: a request line, header lines and a body, any of which may be arbitrary bytes.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import numpy as np
from hypothesis import strategies as st

from model_export.manifest import DATATYPE_TO_NUMPY

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=30)
dims = st.one_of(st.integers(-3, 40), st.sampled_from([16, 2**31, 2**62, 2**64]))
shapes = st.one_of(st.lists(dims, max_size=5), st.just([1, 16]), st.lists(st.just(1), min_size=60, max_size=70))
datatypes = st.one_of(st.sampled_from(sorted(DATATYPE_TO_NUMPY)), st.text(max_size=6))
flags = st.one_of(st.booleans(), json_scalars)
parameters = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "binary_data_output": flags, "binary_data": flags, "binary_data_size": st.integers(-5, 10**6),
    "tenant": json_values}))
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20)
# what an HTTP client can send at all (no control characters, no surrounding whitespace)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200).map(str.strip)


def often(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`value` three times in four, else anything `other` draws: near-valid requests reach deep checks."""
    return st.one_of(st.just(value), st.just(value), st.just(value), other)


def element_count(shape: list[int]) -> int | None:
    if all(isinstance(d, int) and 0 <= d <= 4096 for d in shape) and len(shape) <= 70:
        count = int(np.prod(shape, dtype=np.float64))
        return count if count <= 4096 else None
    return None


@st.composite
def tensors(draw: st.DrawFn, binary: bool) -> tuple[dict[str, Any], bytes]:
    """One tensor of a request and its binary section: mostly right in every field but one."""
    shape = draw(often([draw(st.integers(1, 4)), 16], shapes))
    datatype = draw(often("FP32", datatypes))
    tensor: dict[str, Any] = {"name": draw(often("x", st.text(max_size=8))), "shape": shape, "datatype": datatype}
    count = element_count(shape)
    itemsize = np.dtype(DATATYPE_TO_NUMPY.get(datatype, "float32")).itemsize
    section = b""
    if binary:
        size = draw(often((count or 0) * itemsize, st.integers(-4, 4096)))
        section = draw(often(bytes(max(size, 0)), st.binary(max_size=256)))
        tensor["parameters"] = {**draw(often({}, parameters.map(lambda p: p or {}))), "binary_data_size": size}
    else:
        numbers = st.lists(st.one_of(st.floats(-1e40, 1e40), st.integers(-300, 300)), min_size=count or 0,
                           max_size=count or 0)
        tensor["data"] = draw(often(draw(numbers), st.one_of(st.lists(json_scalars, max_size=8), json_values)))
        extra = draw(parameters)
        if extra is not None:
            tensor["parameters"] = extra
    return tensor, section


@st.composite
def requests(draw: st.DrawFn, binary: bool) -> tuple[dict[str, Any], bytes]:
    """A request header (JSON) and its binary sections."""
    drawn = draw(often([draw(tensors(binary))], st.lists(tensors(binary), max_size=3)))
    request: dict[str, Any] = {"inputs": [t for t, _ in drawn]}
    if draw(st.booleans()):
        request["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": often("y", st.text(max_size=5))}, optional={"parameters": parameters}), max_size=3))
    if draw(st.booleans()):
        request["parameters"] = draw(parameters)
    if draw(st.booleans()):
        request["id"] = draw(st.one_of(st.text(max_size=30), json_scalars))
    return request, b"".join(section for _, section in drawn)


def raw_requests(path: str) -> st.SearchStrategy[bytes]:
    """What arrives on a connection: a request line (mostly a real one to `path`), header lines and a body,
    each possibly arbitrary bytes; framing (content-length, chunking) is whatever the bytes say."""
    line = often(f"POST {path} HTTP/1.1".encode(), st.binary(max_size=60))
    header_lines = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([
        b"host: x", b"content-length: 5", b"content-length: -1", b"content-length: 99999999999999999999",
        b"transfer-encoding: chunked", b"transfer-encoding: gzip, chunked", b"content-type: application/json",
        b"inference-header-content-length: 3", b"expect: 100-continue"])), max_size=6)
    return st.builds(lambda first, headers, body: b"\r\n".join([first, *headers]) + b"\r\n\r\n" + body,
                     line, header_lines, st.binary(max_size=200))


def raw_exchange(connection: socket.socket, data: bytes) -> str:
    """Send `data` on a fresh `connection` (its timeout: how long to wait for an answer), close it, and name
    what came back: the status code of the first response, `closed` (the server closed without answering:
    its right for a malformed request), `kept waiting` (the server is still reading what the framing
    promised) or `garbled`."""
    head = b""
    with connection:
        try:
            connection.sendall(data)
            while b"\r\n" not in head and len(head) < 4096:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            return "kept waiting" if not head else "garbled"
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return "closed"  # over TLS (the gateway's) a close can also come as the TLS session's end
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "closed" if not head else "garbled"
