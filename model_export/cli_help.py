"""What every command line of the project shares: help that shows defaults, and output width.

Here, at the bottom of the layers, so `model_export`, `mesh` and `loadtest` use the same rules.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Any

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

# Wide enough that a log or a pipe gets whole rows; a terminal, or COLUMNS, decides otherwise.
PIPE_WIDTH = 160


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, minus the noise: no "(default: None)" or "(default: False)",
    and nothing added where the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None or default is False or default == argparse.SUPPRESS
            or isinstance(action, argparse._StoreConstAction)  # a flag: its help says what it turns on
            or "default" in text
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subcommands' parsers are CommandParsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def console_width(stream: IO[str] | None = None) -> int | None:
    """Width for a rich Console: the terminal's or $COLUMNS (None lets rich read them), else PIPE_WIDTH."""
    stream = stream or sys.stdout
    if os.environ.get("COLUMNS") or stream.isatty():
        return None
    return PIPE_WIDTH


def fits(renderable: RenderableType, width: int) -> bool:
    """Whether `renderable` (a table whose columns do not wrap) fits `width` columns unwrapped."""
    return Console(width=10_000).measure(renderable).maximum <= width


def compact_table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    """A table drawn with a rule under its header and no frame: the fewest columns spent on drawing.
    Cells never wrap: callers drop columns, or print lines, when `fits` says it is too wide."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in columns:
        table.add_column(col, no_wrap=True, justify="right" if col in right else "left")
    return table
