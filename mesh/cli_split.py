"""`python -m mesh split-canary|split-promote|split-rollback`: a new split of the same model rolled out live on
the local mesh, every request pinned to one split (`x-pipeline-version`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh import split_rollout, state_dir
from mesh.cli_rollout import run_change, state_dir_option
from mesh.local import State


def register(sub: Any) -> None:
    p = sub.add_parser("split-canary",
                       help="start a new split of the model beside the running one and send it a share of new requests")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="the new split's pipeline directory (from `model_export split`); needed the first time")
    p.add_argument("--weight", type=int, required=True, help="percent of new requests pinned to the new split")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new stages to be ready")
    state_dir_option(p)
    p.set_defaults(func=_canary)
    for name, text in (("split-promote", "every new request to the new split; stop the old split's stages"),
                       ("split-rollback", "every new request back to the old split; stop the new split's stages")):
        p = sub.add_parser(name, help=text)
        state_dir_option(p)
        p.set_defaults(func=_promote if name == "split-promote" else _rollback)


def summary(state: State) -> str:
    """`s3-1a2b3c4d 90% (3 stages), s2-5e6f7a8b 10% (2 stages)`: the splits served and their weights."""
    if state.pinning is None:
        return "one split, not pinned"
    return ", ".join(f"{s.name} {s.weight}% ({len(s.plan.stages)} stages)" for s in state.pinning.splits)


def _run(action: Callable[[], State]) -> int:
    return run_change(action, lambda state: f"splits: {summary(state)}")


def _canary(args: argparse.Namespace) -> int:
    where = state_dir.find(args.state_dir)
    return _run(lambda: split_rollout.split_canary(where, args.weight, args.pipeline, args.timeout))


def _promote(args: argparse.Namespace) -> int:
    return _run(lambda: split_rollout.split_promote(state_dir.find(args.state_dir)))


def _rollback(args: argparse.Namespace) -> int:
    return _run(lambda: split_rollout.split_rollback(state_dir.find(args.state_dir)))
