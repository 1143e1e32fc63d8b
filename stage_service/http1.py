"""A small HTTP/1.1 client on asyncio streams, for the hop to the next stage (`chain.NextStage`).

Why not httpx: on one hop of 0.8 MB httpx costs about twice the raw-socket floor, most of it its own layers
(anyio, httpcore, h11), where this client is within a few percent of it (`make bench-hop`, BENCHMARKS.md).
It also writes the request from the tensors' own buffers (`writelines`, no joined copy of the body), and
it speaks TCP or a Unix domain socket alike.

What it does: POST with a known length (never chunked), keep-alive connections pooled per client, at most
`max_connections` at once; responses with Content-Length, chunked, or up to the close. A pooled connection
that the server closed while it sat idle is replaced once, transparently (the request had not reached
anyone). Timeouts are the caller's (`asyncio.timeout` around the call: a cancelled request's connection is
closed, never reused). Errors: `ConnectFailed` (nothing listens), `ProtocolFailed` (the connection broke or
the answer is not HTTP/1.1), both `Http1Error`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 << 10  # status line and headers of a response
MAX_CHUNK_LINE = 1024


class Http1Error(Exception):
    """The request did not get a complete HTTP answer."""


class ConnectFailed(Http1Error):
    """No connection could be opened."""


class ProtocolFailed(Http1Error):
    """The connection broke or the peer did not speak HTTP/1.1 as expected."""


@dataclass(frozen=True)
class Http1Response:
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False

    def usable(self, expiry_s: float) -> bool:
        """Still open, nothing unexpected waiting in it, and not idle for longer than the expiry."""
        return (not self.writer.is_closing() and not self.reader.at_eof() and not self.reader._buffer  # type: ignore[attr-defined]
                and time.monotonic() - self.idle_since < expiry_s)

    def close(self) -> None:
        self.writer.close()


def _check_header(name: str, value: str) -> None:
    if any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
        raise ValueError(f"header {name!r}: a name or value with a line break or a colon in the name")


class Http1Client:
    """POSTs to one server: `base_url` is http://host:port; `uds` (a socket path) replaces host:port for the
    connection itself, while the Host header still names `base_url`'s host."""

    def __init__(self, base_url: str, *, max_connections: int = 64, keepalive_expiry_s: float = 30.0,
                 uds: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url!r}: expected http://host[:port] (this client speaks plain HTTP/1.1)")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode("latin-1")
        self.uds = uds
        self.keepalive_expiry_s = keepalive_expiry_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def post(self, path: str, body: Sequence[bytes | memoryview], headers: Mapping[str, str]) -> Http1Response:
        """Send `body` (its parts written in order, never joined) to `path`; return the whole answer."""
        head = self._request_head(path, sum(memoryview(p).nbytes for p in body), headers)
        async with self._slots:
            for _ in range(2):
                conn = await self._acquire()
                try:
                    response, keep = await self._exchange(conn, head, body)
                except _StaleConnection:
                    conn.close()
                    continue
                except BaseException:
                    conn.close()  # cancelled or broken midway: whatever the server sends next is not ours
                    raise
                self._release(conn, keep)
                return response
        raise ProtocolFailed("the server closed the connection before answering")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------------------------- connections

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(self.keepalive_expiry_s):
                conn.reused = True
                return conn
            conn.close()
        try:
            if self.uds is not None:
                reader, writer = await asyncio.open_unix_connection(self.uds, limit=MAX_HEAD_BYTES)
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.uds or f'{self.host}:{self.port}'}: {exc}") from None
        return _Connection(reader, writer)

    def _release(self, conn: _Connection, keep: bool) -> None:
        if keep and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    # -------------------------------------------------------------------------------------- exchange

    def _request_head(self, path: str, length: int, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {path} HTTP/1.1".encode("latin-1"), b"host: " + self.host_header,
                 b"content-length: %d" % length]
        for name, value in headers.items():
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                continue
            _check_header(name, value)
            lines.append(f"{name}: {value}".encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _exchange(self, conn: _Connection, head: bytes, body: Sequence[bytes | memoryview]
                        ) -> tuple[Http1Response, bool]:
        try:
            conn.writer.writelines([head, *body])
            await conn.writer.drain()
            status_head = await self._read_head(conn)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if conn.reused and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise _StaleConnection from None
            raise ProtocolFailed(f"the connection broke: {type(exc).__name__}") from None
        try:
            status, reason, response_headers = _parse_head(status_head)
            body_bytes, keep = await _read_body(conn.reader, status, response_headers)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ProtocolFailed(f"the connection broke while reading the answer: {type(exc).__name__}") from None
        return Http1Response(status, reason, response_headers, body_bytes), keep

    async def _read_head(self, conn: _Connection) -> bytes:
        while True:
            try:
                block = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise ProtocolFailed(f"the answer's headers are over {MAX_HEAD_BYTES} bytes") from None
            if not block.startswith(b"HTTP/1.1 1") or block.startswith(b"HTTP/1.1 101"):
                return block
            # 1xx informational (100 Continue): the real answer follows


class _StaleConnection(Exception):
    """A reused connection that the server had closed: nothing of this request was answered."""


def _parse_head(block: bytes) -> tuple[int, str, dict[str, str]]:
    lines = block.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolFailed(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolFailed(f"a header line without a colon: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(code), reason, headers


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
    """The body and whether the connection may carry another request."""
    keep = "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader), keep
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ProtocolFailed(f"content-length {length[:40]!r} is not a byte count")
        return await reader.readexactly(int(length)), keep
    return await reader.read(), False  # delimited by the close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\r\n") or len(line) > MAX_CHUNK_LINE:
            raise ProtocolFailed("a broken chunk size line")
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolFailed(f"chunk size {line[:40]!r} is not hexadecimal") from None
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolFailed("a chunk not followed by CRLF")
