"""`python -m stage_service`: serve one stage, configured only by `STAGE_*` environment variables."""

from __future__ import annotations

import logging
import os
import signal
import sys

from pydantic import ValidationError

from stage_service.app import create_app
from stage_service.errors import StartupError
from stage_service.runtime import load_stage
from stage_service.server import DrainingServer, ports_in_use, server_config
from stage_service.settings import ENV_PREFIX, StageSettings, describe_validation_error, unknown_settings
from stage_service.tracing import StageTracing

EXIT_BAD_SETTINGS = 2
EXIT_STARTUP_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    """Check everything, load the stage, serve until SIGTERM/SIGINT, then drain and exit 0."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        if args[0] not in ("-h", "--help"):
            print(f"stage_service: takes no arguments (got {args[0]!r}); it is configured by STAGE_* environment "
                  "variables (see --help)", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        print_settings_help()
        return 0
    unknown = unknown_settings(os.environ)
    if unknown:
        print(f"stage_service: {'; '.join(unknown)}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        settings = StageSettings()  # type: ignore[call-arg]  # required fields come from the environment
    except ValidationError as exc:
        print(f"stage_service: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    taken = ports_in_use(settings)
    if taken:
        print(f"stage_service: cannot start: {'; '.join(taken)}", file=sys.stderr)
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
    server = DrainingServer(server_config(settings, app), settings.drain_delay_s,
                            on_drain=lambda: app.state.plane.set_ready(False))
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler turns that into a
    # clean return, so a SIGTERM-ed stage exits 0 rather than dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else EXIT_STARTUP_FAILED


def print_settings_help() -> None:
    """The settings table: every STAGE_* variable with its default and what it does."""
    from rich.console import Console  # only here: a serving stage never needs it (about 1.4 MB)
    from rich.table import Table
    table = Table(title="python -m stage_service: serve one stage of a pipeline; configured by the environment",
                  title_justify="left", box=None, show_lines=False)
    table.add_column("variable", no_wrap=True)
    table.add_column("default", overflow="fold", max_width=14)
    table.add_column("what it sets")
    for name, field in StageSettings.model_fields.items():
        default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else "(unset)" if default is None else str(default)
        table.add_row(f"{ENV_PREFIX}{name.upper()}", shown, field.description or "")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
