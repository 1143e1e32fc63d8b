"""`python -m mesh`: up, down, status, logs, trace (the local mesh) and render (Kubernetes + Istio)."""

from __future__ import annotations

import argparse
import sys

from mesh import cli_local, cli_render, cli_trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cli_local.register(sub)
    cli_render.register(sub)
    cli_trace.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
