"""The HTTP server of one stage: uvicorn on httptools, plus the connection limits uvicorn leaves out.

uvicorn gives an idle keep-alive timeout (`timeout_keep_alive`) and a bound on open connections past which
requests get 503 (`limit_concurrency`). Its httptools protocol has no limit on the size of the request line
and headers (httptools buffers a header that never ends), no timeout for them to arrive, and none for the
body. `StageHttpProtocol` adds the header size limit (431) and timeout (408, or a silent close of a
connection that never sent a byte), and a last guard on the body; the body's own timeout is answered by the
app (`app.read_body`: 408 as JSON, counted in the metrics). Every refusal here says `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, cast

import httptools
import orjson
import uvicorn
from fastapi import FastAPI
from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from stage_service.app import InferFastPath
from stage_service.limits import BodyBudget
from stage_service.settings import StageSettings

log = logging.getLogger("stage_service")

# The app answers a slow body itself at STAGE_BODY_TIMEOUT_S; the protocol's guard closes what is left later.
BODY_GUARD_GRACE_S = 2.0


# Bodies at least this large are read from the socket straight into one buffer of their Content-Length.
DIRECT_BODY_MIN_BYTES = 16 << 10
# What one read of headers (and small bodies) asks the socket for: uvloop's own read size.
READ_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_header_bytes: int
    body_guard_s: float
    max_request_bytes: int


class StageHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, a header timeout and a body guard, reading a large
    body with a Content-Length straight from the socket into one buffer of that size (`_direct`).

    uvicorn hands a body to the app chunk by chunk: for each 256 KB read it copies the chunk twice, pauses the
    socket past 64 KB and wakes the app, which resumes it; for 3.2 MB that is 13 round trips through the event
    loop and 1.8x the time a bare length-prefixed socket takes. Here the kernel writes the body where the app
    will read it (`np.frombuffer` views of it become the input tensors) and the app wakes once. Headers, small
    bodies and chunked bodies still go through httptools and uvicorn's own path."""

    limits: ClassVar[ConnectionLimits]
    budget: ClassVar[BodyBudget | None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # waiting for a request's headers (or between requests)
        self._began = False  # a request began in the chunk being parsed
        self._completed_here = False  # a request ended in the chunk being parsed
        self._client_done = False  # the client half-closed with answers still owed
        self._last_word: Callable[[], None] | None = None  # a refusal waiting for the answers owed before it
        self._partial = False  # a request has begun and its headers have not all arrived
        self._header_bytes = 0  # of the request whose headers are arriving
        self._refusal: tuple[int, str] | None = None
        self._scratch = memoryview(bytearray(READ_CHUNK_BYTES))
        self._direct: bytearray | None = None  # the body being read into its own buffer
        self._direct_at = 0  # bytes of it arrived
        self._held: dict[RequestResponseCycle, int] = {}  # body budget held for direct bodies not yet received

    # ------------------------------------------------------------------------------ timers

    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._partial:
            self._refuse(408, f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s "
                              "(STAGE_HEADER_TIMEOUT_S)")
        else:  # a connection that never sent a byte is closed without an answer, as idle keep-alives are
            self.transport.close()

    def _body_guard(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.disconnected = True  # whatever the app still sends is dropped
            self._refuse(408, f"the request's body did not arrive within {self.limits.body_guard_s:g} s "
                              "(STAGE_BODY_TIMEOUT_S)")
        else:  # answered already, but the body is still trickling in: end it
            self.transport.close()

    # ---------------------------------------------------------------------------- refusals

    def _answers_owed(self) -> bool:
        """Whether requests that arrived whole are still to be answered on this connection (one whose body is cut
        short by the bad bytes never will be: it is not waited for)."""
        cycles = [self.cycle, *(c for c, _ in self.pipeline)]
        return any(c is not None and not c.response_complete and not c.disconnected and not c.more_body
                   for c in cycles)

    def _last(self, word: Callable[[], None]) -> None:
        """`word` (a refusal that closes the connection) now, or once the answers still owed have left: the requests
        before a bad one were whole, and their answers come first (uvicorn wrote its 400 and closed at once, so a
        pipelining client read the 400 as the answer to its valid request before it)."""
        if self._last_word is not None:
            return  # the first refusal says why; bytes after it only add errors of their own
        if not self._answers_owed():
            word()
            return
        self._last_word = word
        self.flow.pause_reading()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `{"error": message}` with `Connection: close`, then close (after the answers still owed)."""
        self._disarm()
        self._last(functools.partial(self._refuse_now, status, message))

    def _refuse_now(self, status: int, message: str) -> None:
        body = orjson.dumps({"error": message})
        head = [STATUS_LINE[status]]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, made `{"error": ...}` naming what the parser found (uvicorn answers
        the same plain "Invalid HTTP request received." to all); a callback that refused the request made that
        error. Called from uvicorn's `except httptools.HttpParserError`, so the error is the one being handled."""
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        error = sys.exc_info()[1]
        if isinstance(error, httptools.HttpParserCallbackError):
            # raised in a callback (uvicorn's reading of the request line, or ours): not the framing's fault
            log.warning("a request could not be read: %s", error.__context__ or error)
            cause = error.__context__
            self._refuse(400, "invalid HTTP request: its request line or headers could not be read "
                              f"({str(cause)[:200] or type(cause).__name__ if cause else error})")
            return
        found = f": {error}" if isinstance(error, httptools.HttpParserError) and str(error) else ""
        self._refuse(400, f"invalid HTTP request{found}; expected a request framed as RFC 9112 says (one "
                          "decimal Content-Length or chunked Transfer-Encoding, not both; header names and values of "
                          "allowed characters)")

    def _headers_too_large(self, size: int) -> tuple[int, str]:
        self._refusal = (431, f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                              f"({size} so far; STAGE_MAX_HEADER_BYTES)")
        return self._refusal

    # ------------------------------------------------------------------- connection and parser

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, HeadWithBody(transport)))
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio: True keeps the transport open
        """The client half-closed: requests it sent whole are still answered (RFC 9112 allows a client to end its
        side after its requests), then the connection closes; with none, or one cut short, it closes now (the
        transport closes itself when this returns None), what is held sent first."""
        cast(HeadWithBody, self.transport).flush()
        if self._answers_owed() or self._last_word is not None:
            self._client_done = True
            return True
        return None

    def get_buffer(self, sizehint: int) -> memoryview:
        # The loop calls buffer_updated right after the read into this buffer, with nothing in between: `_direct`
        # there still says which buffer it was.
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_at:]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is None:
            self.data_received(bytes(self._scratch[:nbytes]))
            return
        self._direct_at += nbytes
        if self._direct_at == len(self._direct):
            # httptools never saw these bytes: a fresh parser for the next request on this connection.
            self.parser = httptools.HttpRequestParser(self)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self.on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._began = self._completed_here = False
        waiting = self._in_headers
        super().data_received(data)
        if not self._partial or self.transport.is_closing():
            return
        # Bytes of a chunk that began and ended inside one request's headers are all header bytes; headers
        # that end in this chunk are counted by on_url/on_header instead. A request that began in this chunk and
        # whose headers go on past it: where no earlier request ended in the chunk, the chunk began with it, and all
        # of it is this request's (a header line still unfinished is in no callback: 70 KB of one used to wait for
        # the header timeout's 408).
        if waiting and not self._began:
            self._header_bytes += len(data)
        elif self._began and not self._completed_here:
            self._header_bytes = max(self._header_bytes, len(data))
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(*self._headers_too_large(self._header_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began, self._partial, self._in_headers, self._header_bytes = True, True, True, 0
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_parsed(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large(self._header_bytes)
            raise ValueError("headers too large")  # httptools turns it into a parser error: send_400_response

    def on_headers_complete(self) -> None:
        self._in_headers = self._partial = False
        self._arm(self.limits.body_guard_s, self._body_guard)
        super().on_headers_complete()
        size = self._direct_body_size()
        if size is not None and (self.budget is None or self.budget.reserve(size)):
            cycle = self.cycle
            self._direct, self._direct_at = bytearray(size), 0
            self._held[cycle] = size if self.budget is not None else 0
            cycle.receive = _whole_body_receiver(cycle, lambda: self._release(cycle))  # type: ignore[method-assign,assignment]

    def _direct_body_size(self) -> int | None:
        """The Content-Length of a body to read into its own buffer; None to leave the body to uvicorn (small,
        chunked, over the limit (the app answers 413), or a client waiting for `100 Continue`)."""
        if (self.cycle is None or self.expect_100_continue or self.parser.should_upgrade()
                or self.transport.is_closing()):
            return None
        lengths = [value for name, value in self.headers if name == b"content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit():
            return None
        size = int(lengths[0])
        return size if DIRECT_BODY_MIN_BYTES <= size <= self.limits.max_request_bytes else None

    def _release(self, cycle: RequestResponseCycle) -> None:
        """Give back the body budget a direct body held from its headers until the app took it (or never will).
        The app's `read_body` takes the same bytes as it receives them, with no await in between."""
        size = self._held.pop(cycle, 0)
        if size and self.budget is not None:
            self.budget.release(size)

    def on_response_complete(self) -> None:
        for cycle in [c for c in self._held if c.response_complete]:  # answered without reading its body
            self._release(cycle)
        super().on_response_complete()
        if self._answers_owed():
            return
        word, self._last_word = self._last_word, None
        if word is not None:
            word()
        elif self._client_done:
            self.transport.close()  # the last answer a half-closed client was owed

    def on_body(self, body: bytes) -> None:
        if self._direct is None:
            super().on_body(body)
            return
        end = self._direct_at + len(body)
        memoryview(self._direct)[self._direct_at:end] = body
        self._direct_at = end

    def on_message_complete(self) -> None:
        self._in_headers, self._completed_here = True, True
        self._disarm()
        if self._direct is not None:
            self.cycle.body, self._direct = self._direct, None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._direct = None
        for cycle in list(self._held):
            self._release(cycle)
        self._disarm()
        super().connection_lost(exc)


class HeadWithBody:
    """The connection's transport as the protocol and its responses see it: a write waits for the next one, and
    both leave in one `writelines` (one writev). uvicorn writes a response's head and its body apart; sent together
    they are one system call and one segment, and the caller wakes once for the whole answer instead of twice (on
    every stage's answer, up the whole chain). Whatever is held leaves at the latest on the event loop's next turn,
    before a close, and before the transport closes itself on the peer's end of stream (`eof_received`). A write to
    a transport already gone is dropped, as asyncio's own transports drop it (uvloop's raise instead: a pipelined
    request answered after its client went away used to log a traceback)."""

    __slots__ = ("_transport", "_held")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send([held, data])
            return
        self._held = data
        asyncio.get_running_loop().call_soon(self.flush)

    def writelines(self, parts: list[bytes]) -> None:
        held, self._held = self._held, None
        self._send([held, *parts] if held is not None else parts)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send([held])

    def _send(self, parts: list[bytes]) -> None:
        # uvloop: "unable to perform operation on <TCPTransport closed=True>": the peer is gone
        with contextlib.suppress(RuntimeError):
            self._transport.writelines(parts)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, set_protocol, ...
        return getattr(self._transport, name)


def _whole_body_receiver(cycle: RequestResponseCycle, release: Callable[[], None]
                         ) -> Callable[[], Awaitable[ASGIReceiveEvent]]:
    """uvicorn's `receive` for a body read into its own buffer: one message with that buffer, not a copy."""

    async def receive() -> ASGIReceiveEvent:
        if not cycle.disconnected and not cycle.response_complete:
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        body, cycle.body = cycle.body, bytearray()
        release()
        return {"type": "http.request", "body": body, "more_body": cycle.more_body}  # type: ignore[typeddict-item]

    return receive


class BufferedConnection(asyncio.BufferedProtocol):
    """What the event loop sees of one connection: a `BufferedProtocol` passing everything to its
    `StageHttpProtocol`, since uvloop reads into a protocol's own buffers only where the protocol is not also an
    `asyncio.Protocol`, and uvicorn's is."""

    __slots__ = ("http",)

    def __init__(self, http: StageHttpProtocol) -> None:
        self.http = http

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)


def protocol_factory(settings: StageSettings, budget: BodyBudget | None = None) -> Callable[..., BufferedConnection]:
    """What uvicorn builds each connection's protocol with (its `http` setting): a `StageHttpProtocol` with this
    stage's limits and body budget (the app's), behind a `BufferedConnection`."""
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, max_header_bytes=settings.max_header_bytes,
                              body_guard_s=settings.body_timeout_s + BODY_GUARD_GRACE_S,
                              max_request_bytes=settings.max_request_bytes)
    limited = type("StageHttpProtocol", (StageHttpProtocol,), {"limits": limits, "budget": budget})

    def connection(*args: Any, **kwargs: Any) -> BufferedConnection:
        return BufferedConnection(limited(*args, **kwargs))
    return connection


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT first makes the stage not ready (`on_drain`) and keeps it
    serving for `drain_delay_s`, so whoever routes to it (its sidecar's health check, Kubernetes' endpoints)
    stops before it stops listening; then uvicorn's own shutdown finishes what is in flight. A second signal
    stops at once."""

    def __init__(self, config: uvicorn.Config, drain_delay_s: float, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_delay_s = drain_delay_s
        self.on_drain = on_drain
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.drain_delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        self.on_drain()
        timer = threading.Timer(self.drain_delay_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def ports_in_use(settings: StageSettings) -> list[str]:
    """The TCP ports the stage would listen on that another process already listens on, as settings name them:
    checked before the model loads, so a taken port is refused at once, not after loading and warming up."""
    wanted = ([] if settings.uds else [("STAGE_PORT", settings.port)]) + (
        [("STAGE_GRPC_PORT", settings.grpc_port)] if settings.grpc_port is not None and not settings.grpc_uds else [])
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    taken = []
    for variable, port in wanted:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: only a listener conflicts
            try:
                probe.bind((settings.host, port))
            except OSError as exc:
                taken.append(f"{variable} {port} on {settings.host}: {exc.strerror}")
    return taken


def server_config(settings: StageSettings, app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration for one stage: uvloop, the limited httptools protocol, the settings' limits."""
    return uvicorn.Config(
        InferFastPath(app), host=settings.host, port=settings.port, uds=str(settings.uds) if settings.uds else None,
        loop="uvloop", http=cast(Any, protocol_factory(settings, app.state.body_budget)), lifespan="on",
        log_level=settings.log_level, access_log=settings.access_log,
        limit_concurrency=settings.max_connections,
        # In-flight requests may wait on the whole rest of the chain: give them that long to finish.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        # Longer than the callers' idle-connection expiry (chain.KEEPALIVE_EXPIRY_S, Envoy's), so a caller never
        # reuses a connection this server is closing at that very moment (a reset, not retried by the app).
        timeout_keep_alive=settings.keepalive_timeout_s,
    )
