"""`python -m mesh canary|promote|rollback`: one stage's new version rolled out live on the local mesh."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mesh import rollout, state_dir
from mesh.local import MeshError, State
from mesh.policy import PolicyError
from model_export.cli_help import console_width

console = Console(width=console_width(sys.stdout))
err = Console(stderr=True, width=console_width(sys.stderr))


def register(sub: Any) -> None:
    p = sub.add_parser("canary", help="start a stage's new version beside the old and route a share of its requests")
    p.add_argument("--stage", required=True, help="the stage, by name")
    p.add_argument("--version", required=True, help="the new version's name, e.g. v2")
    p.add_argument("--weight", type=int, required=True, help="percent of the stage's requests to the new version")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="the pipeline holding the new version (as retrain-stage writes it); needed the first time")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new replicas to be ready")
    state_dir_option(p)
    p.set_defaults(func=_canary)
    for name, text in (("promote", "all requests to the canary; stop the old version's replicas"),
                       ("rollback", "all requests back to the old version; stop the canary's replicas")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--stage", required=True, help="the stage, by name")
        state_dir_option(p)
        p.set_defaults(func=_promote if name == "promote" else _rollback)


def state_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the mesh's state directory (default: found as `mesh status` finds it)")


def _summary(state: State, stage: str) -> str:
    versions = state.policy.stage(stage).versions
    return ", ".join(f"{v.name} {v.weight}% ({len(state.layout.of_version(stage, v.name))} replicas)" for v in versions)


def run_change(action: Callable[[], State], routes: Callable[[State], str]) -> int:
    """Make one change to the running mesh, then print one line of how it routes now (`routes`); an error is
    one line and exit 2."""
    try:
        state = action()
    except (MeshError, PolicyError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    console.print(routes(state), highlight=False, soft_wrap=True)
    return 0


def _run(args: argparse.Namespace, action: Callable[[], State]) -> int:
    return run_change(action, lambda state: f"{args.stage}: {_summary(state, args.stage)}")


def _canary(args: argparse.Namespace) -> int:
    where = state_dir.find(args.state_dir)
    return _run(args, lambda: rollout.canary(where, args.stage, args.version, args.weight, args.pipeline,
                                             args.timeout))


def _promote(args: argparse.Namespace) -> int:
    return _run(args, lambda: rollout.promote(state_dir.find(args.state_dir), args.stage))


def _rollback(args: argparse.Namespace) -> int:
    return _run(args, lambda: rollout.rollback(state_dir.find(args.state_dir), args.stage))
