"""The error boundary under real uvicorn with the stage's protocol: an exception nothing handled becomes a 500
`{"error": ...}` and the kept-alive connection stays usable (issue 14, row 3: uvicorn used to close it after
Starlette's ServerErrorMiddleware re-raised, and the caller's next request on it was reset)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from stage_service.errors import ErrorBoundary, InvalidInput, install_handlers
from stage_service.server import protocol_class
from stage_service.settings import StageSettings
from tests.stage_service.procs import HOST, free_port
from tests.stage_service.wire import Wire


def failing_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    app.add_middleware(ErrorBoundary)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/bad")
    async def bad() -> None:
        raise InvalidInput("tensor x: wrong")

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    settings = StageSettings(manifest=Path("unused"), name="unused", port=port)
    config = uvicorn.Config(failing_app(), host=HOST, port=port, http=protocol_class(settings), log_level="critical",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://{HOST}:{port}"
    server.should_exit = True
    thread.join(10)


def test_an_unexpected_error_is_a_500_on_a_connection_that_stays_usable(url: str) -> None:
    with Wire(url) as wire:
        for _ in range(3):
            reply = wire.request("GET", "/boom")
            assert reply.status == 500 and reply.json() == {"error": "internal error: RuntimeError"}
            assert not reply.closes
            reply = wire.request("GET", "/bad")
            assert reply.status == 400 and reply.json() == {"error": "tensor x: wrong"}
            assert wire.request("GET", "/ok").status == 200
