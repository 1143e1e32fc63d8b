"""stage_service.http1: the hop's HTTP/1.1 client against real sockets (TCP and Unix) served by small asyncio
servers that answer exactly as a test needs, and against a real stage process."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from stage_service.http1 import ConnectFailed, Http1Client, ProtocolFailed
from stage_service.launch import HOST, free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return head, await reader.readexactly(length)


def serve(handler: Handler, test: Callable[[Http1Client], Awaitable[None]], uds: str | None = None) -> None:
    async def main() -> None:
        if uds:
            server = await asyncio.start_unix_server(handler, uds)
            client = Http1Client("http://stage-1:8080", uds=uds)
        else:
            server = await asyncio.start_server(handler, HOST, 0)
            client = Http1Client(f"http://{HOST}:{server.sockets[0].getsockname()[1]}")
        async with server:
            try:
                await test(client)
            finally:
                await client.aclose()
    asyncio.run(main())


def echo_length(keep: bool = True, announce: bool = True) -> Handler:
    """Answers every request with its body's length, keeping the connection open (or closing it after one
    answer, saying so in `Connection: close` or, `announce` False, not)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, body = await read_request(reader)
                text = str(len(body)).encode()
                close = b"connection: close\r\n" if not keep and announce else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(text), close, text))
                await writer.drain()
                if not keep:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()
    return handle


def test_body_parts_are_sent_in_order_and_connections_reused() -> None:
    connections = 0
    inner = echo_length()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await inner(reader, writer)

    async def test(client: Http1Client) -> None:
        array = np.arange(1000, dtype=np.float32)
        for _ in range(3):
            r = await client.post("/x", [b"head", memoryview(array).cast("B")], {"x-a": "1"})
            assert (r.status, r.body) == (200, b"4004")
    serve(handle, test)
    assert connections == 1


@pytest.mark.parametrize("announce", [True, False])
def test_a_connection_the_server_closes_is_replaced(announce: bool) -> None:
    connections = 0
    inner = echo_length(keep=False, announce=announce)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await inner(reader, writer)

    async def test(client: Http1Client) -> None:
        for i in range(3):
            r = await client.post("/x", [b"abc"], {})
            assert r.body == b"3"
            if i == 1:  # the next request finds the pooled connection closed already, or writes into the close
                await asyncio.sleep(0.05)
    serve(handle, test)
    assert connections == 3


def test_chunked_answers_are_read_whole() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\nx-y: z\r\n\r\n"
                     b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\n\r\n")
        await writer.drain()

    async def test(client: Http1Client) -> None:
        r = await client.post("/x", [b""], {})
        assert (r.status, r.reason, r.body, r.header("X-Y")) == (201, "Created", b"abcdefgh", "z")
    serve(handle, test)


def test_an_answer_that_is_not_http_fails_naming_it() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def test(client: Http1Client) -> None:
        with pytest.raises(ProtocolFailed, match="not an HTTP/1.1 status line"):
            await client.post("/x", [b"a"], {})
    serve(handle, test)


def test_a_server_that_closes_midway_fails_cleanly() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async def test(client: Http1Client) -> None:
        with pytest.raises(ProtocolFailed, match="broke"):
            await client.post("/x", [b"a"], {})
    serve(handle, test)


def test_a_cancelled_request_leaves_no_connection_for_reuse() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.3)  # answers after the caller gave up
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
        await writer.drain()
        await echo_length()(reader, writer)

    async def test(client: Http1Client) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.post("/x", [b"a"], {})
        assert client._idle == []  # the late answer can never be read as the next request's
    serve(handle, test)


def test_nothing_listening_is_connect_failed() -> None:
    async def main() -> None:
        client = Http1Client(f"http://{HOST}:{free_port()}")
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await client.post("/x", [b"a"], {})
    asyncio.run(main())


def test_header_injection_is_refused() -> None:
    async def main() -> None:
        client = Http1Client(f"http://{HOST}:{free_port()}")
        with pytest.raises(ValueError, match="line break"):
            await client.post("/x", [b"a"], {"x-a": "1\r\nx-b: 2"})
    asyncio.run(main())


def test_over_a_unix_socket_the_host_header_names_the_url() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def test(client: Http1Client) -> None:
        assert (await client.post("/v2/x", [b"a"], {})).body == b"ok"
    with tempfile.TemporaryDirectory() as tmp:
        serve(handle, test, uds=str(Path(tmp) / "s.sock"))
    assert seen[0].startswith(b"POST /v2/x HTTP/1.1\r\nhost: stage-1:8080\r\n")


def test_a_base_url_that_is_not_plain_http_is_refused() -> None:
    with pytest.raises(ValueError, match="http://host"):
        Http1Client("https://a:1")


def test_the_next_stage_is_asked_once_more_when_its_answer_breaks_midway() -> None:
    """A replica that dies while answering (after Envoy can still retry) breaks the connection midway; the
    stage sends the same request once more, and only a second break becomes the 502 'unreachable'."""
    from stage_service.chain import NextStage, UpstreamError
    from stage_service.protocol import HEADER_LENGTH, encode_response

    y = np.arange(4, dtype=np.float32).reshape(1, 4)
    body, header_length = encode_response("next", "v1", None, None, [("y", y, True)])
    answers = {"n": 0}

    def breaking(times: int) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            answers["n"] += 1
            head = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s: %d\r\n\r\n"
                    % (len(body), HEADER_LENGTH.encode(), header_length or 0))
            writer.write(head + (body[: len(body) // 2] if answers["n"] <= times else body))
            await writer.drain()
            writer.close()
        return handle

    async def ask(times: int) -> dict[str, np.ndarray] | str:
        answers["n"] = 0
        server = await asyncio.start_server(breaking(times), HOST, 0)
        async with server:
            stage = NextStage(f"http://{HOST}:{server.sockets[0].getsockname()[1]}", "next", 10.0, 4)
            try:
                outputs, _, _ = await stage.infer({"x": np.ones((1, 4), np.float32)}, None, {})
                return outputs
            except UpstreamError as exc:
                return str(exc)
            finally:
                await stage.aclose()

    once = asyncio.run(ask(1))
    assert isinstance(once, dict) and np.array_equal(once["y"], y) and answers["n"] == 2
    twice = asyncio.run(ask(2))
    assert isinstance(twice, str) and "next stage next is unreachable (ProtocolFailed)" in twice
    assert answers["n"] == 2
