"""`python -m mesh`: up, down, status, logs, apply, demo-request, trace (the local mesh), canary, promote and
rollback (one stage's new version), split-canary, split-promote and split-rollback (a new split, requests
pinned), render, validate and parity (Kubernetes + Istio); plan (replicas from measured costs)."""

from __future__ import annotations

import sys

from mesh import cli_capacity, cli_local, cli_parity, cli_render, cli_rollout, cli_split, cli_trace, cli_validate
from model_export.cli_help import CommandParser


def build_parser() -> CommandParser:
    parser = CommandParser(prog="python -m mesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_local.register(sub)
    cli_render.register(sub)
    cli_trace.register(sub)
    cli_validate.register(sub)
    cli_capacity.register(sub)
    cli_rollout.register(sub)
    cli_split.register(sub)
    cli_parity.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C while a command waits (on the mesh's lock, say): no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
