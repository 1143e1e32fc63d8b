"""`python -m stage_service`: serve one stage, configured only by `STAGE_*` environment variables."""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from stage_service.app import create_app
from stage_service.errors import StartupError
from stage_service.runtime import load_stage
from stage_service.settings import StageSettings, describe_validation_error
from stage_service.tracing import StageTracing

EXIT_BAD_SETTINGS = 2
EXIT_STARTUP_FAILED = 3
KEEPALIVE_TIMEOUT_S = 75


def main() -> int:
    """Check everything, load the stage, serve until SIGTERM/SIGINT, then drain and exit 0."""
    try:
        settings = StageSettings()  # type: ignore[call-arg]  # required fields come from the environment
    except ValidationError as exc:
        print(f"stage_service: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime = load_stage(settings)
        place = runtime.place
        tracing = StageTracing.from_env(pipeline=place.manifest.name, stage=place.stage.name,
                                        version=place.version, index=place.index, trace_file=settings.trace_file)
    except StartupError as exc:
        print(f"stage_service: cannot start: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    app = create_app(settings, runtime, tracing)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools", lifespan="on",
        log_level=settings.log_level, access_log=settings.access_log,
        # In-flight requests may wait on the whole rest of the chain: give them that long to finish.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        # Longer than the callers' idle-connection expiry (chain.KEEPALIVE_EXPIRY_S, Envoy's), so a caller never
        # reuses a connection this server is closing at that very moment (a reset, not retried by the app).
        timeout_keep_alive=KEEPALIVE_TIMEOUT_S,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler turns that into a
    # clean return, so a SIGTERM-ed stage exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else EXIT_STARTUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
