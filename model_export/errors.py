"""One error type for every user-facing failure of model_export: the CLI prints its message and exits 2."""

from __future__ import annotations


class ExportError(Exception):
    """Bad input or a failed check; the message names what is wrong and what was expected."""
