"""One error type for every user-facing failure of model_export: the CLI prints its message and exits 2."""

from __future__ import annotations

import re

from pydantic import ValidationError


class ExportError(Exception):
    """Bad input or a failed check; the message names what is wrong and what was expected."""


def validation_problems(exc: ValidationError, most: int = 3) -> str:
    """pydantic's errors as one line: where (dotted), what was wrong and, for a plain value, the value given;
    the first `most` of them."""
    problems = []
    for error in exc.errors()[:most]:
        where = ".".join(str(part) for part in error["loc"])
        message = re.sub(r" or instance of \w+", "", error["msg"])
        if error["type"] == "too_short":  # pydantic's "List should have at least 1 item after validation, not 0"
            context = error.get("ctx") or {}
            message = (f"expected at least {context.get('min_length', 1)} item(s), got "
                       f"{context.get('actual_length', 'fewer')}")
        given = "" if error["type"] in ("missing", "too_short") else f" (got {_given(error['input'])})"
        problems.append(f"{where or 'the document'}: {message}{given}")
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def _given(value: object) -> str:
    """A value as an error quotes it: a plain one as written (cut at 60 characters), else only its kind (a
    tensor's data may be a list of a million numbers)."""
    if value is None or isinstance(value, str | int | float | bool):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    kinds = {list: "an array", dict: "an object"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)
