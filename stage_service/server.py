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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import orjson
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from stage_service.settings import StageSettings

# The app answers a slow body itself at STAGE_BODY_TIMEOUT_S; the protocol's guard closes what is left later.
BODY_GUARD_GRACE_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_header_bytes: int
    body_guard_s: float


class StageHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, a header timeout and a body guard."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # waiting for a request's headers (or between requests)
        self._began = False  # a request began in the chunk being parsed
        self._partial = False  # a request has begun and its headers have not all arrived
        self._header_bytes = 0  # of the request whose headers are arriving
        self._refusal: tuple[int, str] | None = None

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

    def _refuse(self, status: int, message: str) -> None:
        """Answer `{"error": message}` with `Connection: close`, then close."""
        self._disarm()
        body = orjson.dumps({"error": message})
        head = [STATUS_LINE[status]]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; a callback that refused the request made that error."""
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _headers_too_large(self, size: int) -> tuple[int, str]:
        self._refusal = (431, f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                              f"({size} so far; STAGE_MAX_HEADER_BYTES)")
        return self._refusal

    # ------------------------------------------------------------------- connection and parser

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._began = False
        waiting = self._in_headers
        super().data_received(data)
        # Bytes of a chunk that began and ended inside one request's headers are all header bytes; headers
        # that end in this chunk are counted by on_url/on_header instead.
        if waiting and self._in_headers and not self._began and not self.transport.is_closing():
            self._header_bytes += len(data)
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

    def on_message_complete(self) -> None:
        self._in_headers = True
        self._disarm()
        super().on_message_complete()


def protocol_class(settings: StageSettings) -> type[StageHttpProtocol]:
    """`StageHttpProtocol` with this stage's limits (uvicorn builds one per connection from the class)."""
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, max_header_bytes=settings.max_header_bytes,
                              body_guard_s=settings.body_timeout_s + BODY_GUARD_GRACE_S)
    return type("StageHttpProtocol", (StageHttpProtocol,), {"limits": limits})


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


def server_config(settings: StageSettings, app: ASGIApp) -> uvicorn.Config:
    """uvicorn's configuration for one stage: uvloop, the limited httptools protocol, the settings' limits."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, uds=str(settings.uds) if settings.uds else None,
        loop="uvloop", http=protocol_class(settings), lifespan="on",
        log_level=settings.log_level, access_log=settings.access_log,
        limit_concurrency=settings.max_connections,
        # In-flight requests may wait on the whole rest of the chain: give them that long to finish.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        # Longer than the callers' idle-connection expiry (chain.KEEPALIVE_EXPIRY_S, Envoy's), so a caller never
        # reuses a connection this server is closing at that very moment (a reset, not retried by the app).
        timeout_keep_alive=settings.keepalive_timeout_s,
    )
