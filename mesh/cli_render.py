"""Command-line entry points for the render side of `python -m mesh` (filled in by its issue)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this side's subcommands to the `python -m mesh` parser."""
    del sub


def _unused(args: argparse.Namespace) -> int:
    return 0
