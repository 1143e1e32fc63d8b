"""Transport candidates for the stage-to-stage hop, measured against the raw-socket floor in one run.

One hop: a client sends a body of N bytes, the server reads all of it and answers two bytes. Servers run in
their own process (`python -m benchmarks.transports --serve KIND --port P`), one at a time is not needed:
all are up at once and the requests of every candidate are interleaved, so load from other processes on the
machine falls on every candidate alike (the machine is shared: only ratios within one run mean anything).

- floor: raw asyncio streams (uvloop) with an 8-byte length prefix, server and client: the Python floor.
- servers: uvicorn (httptools, uvloop: the stage server today) and granian (Rust HTTP, ASGI), both serving
  the same small FastAPI app, whose route reads the body the way the stage's route does (`app.read_body`).
- clients (async, on uvloop, as the forwarding client runs inside a stage): httpx (today), pyreqwest (Rust,
  reqwest/hyper) and `stage_service.http1` (this repo's own HTTP/1.1 client on asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response

from stage_service.launch import HOST, free_port
from stage_service.supervisor import Child, Target, port_open, wait_ready

SIZES = {"0.8 MB": 800_000, "3.2 MB": 3_200_000}  # bytes, as the reference model's activations
PREFIX = struct.Struct("<Q")
SERVERS = ("uvicorn", "uvicorn-stage", "granian")
CLIENTS = ("httpx", "pyreqwest", "http1")


# ------------------------------------------------------------------------------------------------ servers


def fastapi_app() -> Any:
    """The FastAPI app every HTTP server serves: POST /infer reads the whole body, answers b"ok"."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/infer")
    async def infer(request: Request) -> Response:
        chunks = [chunk async for chunk in request.stream() if chunk]  # Starlette ends with b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        assert len(body) == int(request.headers["content-length"])
        return Response(b"ok", media_type="application/octet-stream")

    return app


async def _serve_raw(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = PREFIX.unpack(await reader.readexactly(PREFIX.size))
                await reader.readexactly(size)
                writer.write(PREFIX.pack(2) + b"ok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    # A limit above the largest body, so the stream never pauses the socket while a body arrives.
    server = await asyncio.start_server(handle, HOST, port, limit=64 << 20)
    async with server:
        await server.serve_forever()


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "raw":
        uvloop.run(_serve_raw(port))
    elif kind in ("uvicorn", "uvicorn-stage"):
        import uvicorn

        http: Any = "httptools"
        if kind == "uvicorn-stage":
            from stage_service.server import protocol_factory
            from stage_service.settings import StageSettings

            http = protocol_factory(StageSettings.model_construct())
        uvicorn.run(fastapi_app(), host=HOST, port=port, loop="uvloop", http=http, log_level="warning",
                    lifespan="off")
    elif kind == "granian":
        from granian.constants import Interfaces, Loops
        from granian.server import Server

        Server("benchmarks.transports:app_factory", address=HOST, port=port, interface=Interfaces.ASGI,
               workers=1, loop=Loops.uvloop, log_enabled=False, factory=True).serve()
    else:
        raise SystemExit(f"unknown server {kind!r}; expected raw, uvicorn or granian")


def app_factory() -> Any:
    return fastapi_app()


def start_servers(log_dir: Path) -> tuple[list[Child], dict[str, int]]:
    children: list[Child] = []
    ports: dict[str, int] = {}
    targets: list[Target] = []
    try:
        for kind in ("raw", *SERVERS):
            port = free_port()
            child = Child.start(f"{kind} server", [sys.executable, "-m", "benchmarks.transports", "--serve", kind,
                                                   "--port", str(port)], log_dir / f"{kind}.log")
            children.append(child)
            ports[kind] = port
            targets.append(child.target(port_open(HOST, port)))
        wait_ready(targets, timeout=60)
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children, ports


# ------------------------------------------------------------------------------------------------ clients

Send = Callable[[bytes], Awaitable[None]]


async def raw_client(port: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    reader, writer = await asyncio.open_connection(HOST, port)

    async def send(body: bytes) -> None:
        writer.writelines([PREFIX.pack(len(body)), body])
        (size,) = PREFIX.unpack(await reader.readexactly(PREFIX.size))
        assert await reader.readexactly(size) == b"ok"

    async def close() -> None:
        writer.close()
    return send, close


async def httpx_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(timeout=60)

    async def send(body: bytes) -> None:
        r = await client.post(url, content=body, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200 and r.content == b"ok"
    return send, client.aclose


async def pyreqwest_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().http1_only().build()

    async def send(body: bytes) -> None:
        r = await client.post(url).header("content-type", "application/octet-stream").body_bytes(body).build().send()
        assert r.status == 200 and bytes(await r.bytes()) == b"ok"
    return send, client.close


async def http1_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from stage_service.http1 import Http1Client

    client = Http1Client(url.rsplit("/", 1)[0], max_connections=8)
    path = "/" + url.rsplit("/", 1)[1]

    async def send(body: bytes) -> None:
        r = await client.post(path, [body], {"content-type": "application/octet-stream"})
        assert r.status == 200 and r.body == b"ok"
    return send, client.aclose


CLIENT_MAKERS = {"httpx": httpx_client, "pyreqwest": pyreqwest_client, "http1": http1_client}


# ---------------------------------------------------------------------------------------------- the run


async def _measure(ports: dict[str, int], runs: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    candidates: dict[str, Send] = {}
    closers = []
    send, close = await raw_client(ports["raw"])
    candidates["floor"] = send
    closers.append(close)
    for server in SERVERS:
        for client in CLIENTS:
            send, close = await CLIENT_MAKERS[client](f"http://{HOST}:{ports[server]}/infer")
            candidates[f"{server} + {client}"] = send
            closers.append(close)
    times: dict[str, dict[str, list[float]]] = {}
    rng = np.random.default_rng(0)
    try:
        for label, size in SIZES.items():
            body = rng.integers(0, 255, size, dtype=np.uint8).tobytes()
            samples: dict[str, list[float]] = {name: [] for name in candidates}
            for i in range(warmup + runs):
                for name, send in candidates.items():
                    start = time.perf_counter()
                    await send(body)
                    if i >= warmup:
                        samples[name].append((time.perf_counter() - start) * 1000.0)
            times[label] = samples
    finally:
        for close in closers:
            await close()
    return times


def run(log_dir: Path, runs: int = 100, warmup: int = 10) -> dict[str, Any]:
    """Every candidate at every size: p50/p99 ms and the p50 over the floor's, all from this one run."""
    import uvloop

    children, ports = start_servers(log_dir)
    try:
        times = uvloop.run(_measure(ports, runs, warmup))
    finally:
        for child in children:
            child.stop()
    out: dict[str, Any] = {}
    for label, samples in times.items():
        floor = float(np.percentile(samples["floor"], 50))
        out[label] = {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "n": len(v),
                             "over_floor": float(np.percentile(v, 50)) / floor} for name, v in samples.items()}
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    labels = list(results)
    head = "| server + client | " + " | ".join(f"{s} p50 ms | {s} p99 ms | {s} / floor" for s in labels) + " |"
    lines = [head, "| --- |" + " ---: | ---: | ---: |" * len(labels)]
    for name in results[labels[0]]:
        rows = [results[s][name] for s in labels]
        cells = [f"{r['p50']:.2f} | {r['p99']:.2f} | {r['over_floor']:.2f}x" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transports", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--serve", choices=["raw", *SERVERS])
    parser.add_argument("--port", type=int)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    import tempfile

    results = run(Path(tempfile.mkdtemp(prefix="transports-")), runs=args.runs)
    print("\n".join(markdown(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
