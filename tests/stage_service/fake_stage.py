"""A test-only proxy that stands in front of a real stage, to make the next stage slow or watch it.

    python -m tests.stage_service.fake_stage --port P --target http://127.0.0.1:Q

- forwards every request to the same path on `--target` and returns its answer unchanged;
- remembers the headers of the last request it received: `GET /_fake/seen`;
- holds a request that carries `x-pipeline-test-hold: 1` (a header every stage propagates) until
  `POST /_fake/release` (releases all held so far), so tests can keep requests in flight without sleeping;
- `GET /_fake/held` says how many requests it holds now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

HOLD_HEADER = "x-pipeline-test-hold"
HOP_BY_HOP = {"host", "content-length", "connection", "transfer-encoding"}


class FakeStage:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.client: httpx.AsyncClient | None = None
        self.seen: dict[str, str] = {}
        self.held: list[asyncio.Future[None]] = []

    async def _reply(self, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _json(self, send: Send, data: Any) -> None:
        await self._reply(send, 200, json.dumps(data).encode(), [(b"content-type", b"application/json")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = httpx.AsyncClient(timeout=None)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/_fake/seen":
            return await self._json(send, self.seen)
        if path == "/_fake/held":
            return await self._json(send, {"held": len(self.held)})
        if path == "/_fake/release":
            held, self.held = self.held, []
            for future in held:
                if not future.done():
                    future.set_result(None)
            return await self._json(send, {"released": len(held)})

        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen = headers
        if headers.get(HOLD_HEADER) == "1":
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.held.append(future)
            await future
        assert self.client is not None
        query = scope.get("query_string", b"").decode()
        response = await self.client.request(
            scope["method"], f"{self.target}{path}" + (f"?{query}" if query else ""), content=body,
            headers={k: v for k, v in headers.items() if k not in HOP_BY_HOP},
        )
        out = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
        await self._reply(send, response.status_code, response.content, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True)
    args = parser.parse_args()
    uvicorn.run(FakeStage(args.target), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
