"""Slow and oversized clients at the local mesh's gateway (mesh.yaml `clients`): a client that trickles its
headers is cut off while good requests still get through, headers over the limits get 431; an answer given
before the body is in reaches an HTTP/2 client whole; and only the pipeline's model paths and health reach the
first stage through the gateway."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import numpy as np
import pytest

from mesh import local
from mesh.v2client import infer
from model_export.manifest import Manifest
from tests.mesh.local_mesh import running_mesh, write_policy

HEADERS_TIMEOUT_S = 1.0
TRICKLERS = 16
TRICKLE_EVERY_S = 0.2
GIVE_UP_S = 20.0  # a bound, not a timing: without the limit a trickler is never cut


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh-clients") / ".mesh"


@pytest.fixture(scope="module")
def mesh(tiny_pipeline: tuple[Path, Manifest], state_dir: Path) -> Iterator[local.State]:
    policy = write_policy(state_dir.parent / "mesh.yaml", {
        "clients": {"request_headers_timeout_s": HEADERS_TIMEOUT_S, "max_request_headers_kb": 8,
                    "max_headers_count": 50}})
    with running_mesh(tiny_pipeline[0], policy, state_dir) as state:
        yield state


@pytest.fixture(scope="module")
def gateway(mesh: local.State, state_dir: Path) -> local.GatewayCredentials:
    return local.gateway_credentials(state_dir, mesh, "tests")


def _trickler(gateway: local.GatewayCredentials, port: int) -> ssl.SSLSocket:
    context = gateway.ssl_context()
    assert context is not None
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_S),
                               server_hostname="127.0.0.1")
    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: pipeline.local\r\n")
    sock.setblocking(False)
    return sock


def _cut_off(sock: ssl.SSLSocket) -> bytes | None:
    """What the gateway sent before closing (b"" for a bare close), or None while it still holds it open."""
    try:
        sock.sendall(b"X-Slow: 1\r\n")
        return sock.recv(4096)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except (ConnectionResetError, BrokenPipeError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return b""


def test_trickling_headers_are_cut_off_while_good_requests_pass(mesh: local.State,
                                                                gateway: local.GatewayCredentials) -> None:
    port = mesh.layout.gateway_port
    socks = [_trickler(gateway, port) for _ in range(TRICKLERS)]
    answers: dict[int, bytes] = {}
    good = 0
    deadline = time.monotonic() + GIVE_UP_S
    with gateway.client(timeout=10.0) as client:
        while len(answers) < len(socks) and time.monotonic() < deadline:
            if len(answers) == 0:  # every trickler still holds its connection
                outputs, response = infer(client, mesh.layout.gateway_url, "tiny",
                                          {"x": np.ones((1, 16), np.float32)}, binary=False)
                assert response.status_code == 200 and outputs
                good += 1
            time.sleep(TRICKLE_EVERY_S)
            for i, sock in enumerate(socks):
                if i not in answers and (got := _cut_off(sock)) is not None:
                    answers[i] = got
    for sock in socks:
        sock.close()
    assert good > 0, "no good request was sent while the tricklers held their connections"
    assert len(answers) == TRICKLERS, f"{TRICKLERS - len(answers)} trickling clients still held after {GIVE_UP_S}s"
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers.values()), set(answers.values())


def test_headers_over_the_limits_get_431(mesh: local.State, gateway: local.GatewayCredentials) -> None:
    url = f"{mesh.layout.gateway_url}/v2/health/ready"
    with gateway.client(timeout=10.0) as client:
        assert client.get(url).status_code == 200
        assert client.get(url, headers={"x-big": "a" * 9000}).status_code == 431
        assert client.get(url, headers={f"x-{i}": "1" for i in range(60)}).status_code == 431


@pytest.mark.parametrize("framing", [b"transfer-encoding: gzip, chunked",
                                     b"transfer-encoding: chunked\r\ntransfer-encoding: chunked"])
def test_framing_envoy_does_not_implement_gets_400_not_501(mesh: local.State, gateway: local.GatewayCredentials,
                                                           framing: bytes) -> None:
    """Envoy answers a transfer coding other than one `chunked` with 501 (RFC 9112 allows it); the gateway maps
    that local reply to the 400 the stage apps give, naming the framing it expects (found by make reliability's
    raw-bytes fuzz)."""
    context = gateway.ssl_context()
    assert context is not None
    raw = socket.create_connection(("127.0.0.1", mesh.layout.gateway_port), timeout=GIVE_UP_S)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n\r\n0\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b"transfer-encoding: chunked" in reply, reply


def test_only_the_pipeline_and_health_reach_the_first_stage(mesh: local.State,
                                                            gateway: local.GatewayCredentials) -> None:
    url = mesh.layout.gateway_url
    with gateway.client(timeout=10.0) as client:
        for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/tiny", "/v2/models/tiny/ready"):
            assert client.get(url + path).status_code == 200, path
        for path in ("/metrics", "/v2", "/v2/models/tiny-stage-0", "/v2/models/tiny-stage-1/ready",
                     "/v2/models/tinyx", "/docs", "/openapi.json"):
            response = client.get(url + path)
            assert response.status_code == 404, (path, response.status_code, response.text)
            assert "127.0.0.1" not in response.text and "stage" not in response.text, response.text
            assert response.json() == {"error": "no route for this path here; routed: /v2/models/tiny, "
                                                "/v2/models/tiny/*, /v2/health/*"}


def _h2_early_answer(gateway: local.GatewayCredentials, port: int, headers: list[tuple[str, str]],
                     declared: int) -> tuple[list[h2.events.Event], bytes]:
    """POST over HTTP/2 a body that declares `declared` bytes, sending only the first flow-control window of it,
    and read what the gateway answers until it ends the stream: its events, and the answer's body."""
    context = gateway.ssl_context()
    assert context is not None
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_S)
    events: list[h2.events.Event] = []
    body = b""
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/v2/models/tiny/infer"), (":scheme", "https"),
                              (":authority", "127.0.0.1"), ("content-type", "application/octet-stream"),
                              ("content-length", str(declared)), *headers])
        conn.send_data(1, b"\0" * conn.max_outbound_frame_size)
        sock.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.StreamReset) for e in events) and (data := sock.recv(65536)):
            for event in conn.receive_data(data):
                events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
            sock.sendall(conn.data_to_send())
    return events, body


@pytest.mark.parametrize("token", [False, True])
def test_early_answers_over_http2_arrive_whole_before_the_upload_is_ended(
        mesh: local.State, gateway: local.GatewayCredentials, token: bool) -> None:
    """The gateway answers a request it refuses before the body is in (no token: 401; a valid token and a body
    over STAGE_MAX_REQUEST_BYTES: the first stage's 413) with the whole answer, then ends the client's upload
    with RST_STREAM(NO_ERROR), as RFC 9113 section 8.1 provides (the README's note on curl 7.88)."""
    headers = [("authorization", f"Bearer {gateway.token}")] if token else []
    events, body = _h2_early_answer(gateway, mesh.layout.gateway_port, headers, 70 * 2**20)
    kinds = [type(e) for e in events if isinstance(e, (h2.events.ResponseReceived, h2.events.StreamEnded,
                                                      h2.events.StreamReset))]
    assert kinds == [h2.events.ResponseReceived, h2.events.StreamEnded, h2.events.StreamReset], events
    response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    reset = next(e for e in events if isinstance(e, h2.events.StreamReset))
    assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
    status = dict(response.headers)[b":status"]
    if token:
        assert status == b"413" and b"STAGE_MAX_REQUEST_BYTES" in body, body
    else:
        assert status == b"401" and body == b"Jwt is missing", body
