"""What is wrong with a `mesh.yaml`, said the way a user can act on it: one line per problem, with the file and
line, the field's dotted path, and for an unknown key the known field it most likely meant:

    mesh.yaml:31: defaults.replica: unknown field; did you mean 'replicas'?
    mesh.yaml:44: stages.reference-stage-3.versions: version weights must sum to 100, got 110 (['v1', 'v2'])

`mesh.policy.load_policy` reads the file; this module turns pydantic's and PyYAML's errors into such lines.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or "; expected one of ..." where none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(sorted(choices))}" if choices else ""


def key_lines(text: str) -> dict[Loc, int]:
    """The 1-based line of every key and list item of a YAML document, by its path."""
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*loc, str(key.value))
                lines[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*loc, i)] = item.start_mark.line + 1
                walk(item, (*loc, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def dotted(loc: Loc) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of `loc` (dict keys and list indices passed through)."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation, part)
        if annotation is None:
            return None
    model = _unwrap(annotation, None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any, part: str | int | None) -> Any:
    """Step from `annotation` into `part`: a field of a model, a value of a dict, an item of a list;
    `part` None only strips Optional."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in args if a is not type(None))
        elif part is None:
            return annotation
        elif origin is dict:
            return args[1]
        elif origin is list:
            return args[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            return field.annotation if field is not None else None
        else:
            return None


def _message(error: ErrorDetails, root: type[BaseModel]) -> str:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        known = list(model.model_fields) if model else []
        return f"unknown field{did_you_mean(str(loc[-1]), known)}"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in ("value_error", "assertion_error") or kind == "missing":
        return message
    given = error.get("input")
    shown = repr(given) if not isinstance(given, dict | list) or len(repr(given)) <= 60 else type(given).__name__
    return f"{message[:1].lower()}{message[1:]} (got {shown})"


def explain(exc: ValidationError, path: Path, text: str, root: type[BaseModel]) -> str:
    """One line per problem of `exc`: `<file>:<line>: <field path>: <what is wrong>`."""
    lines = key_lines(text)
    found = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        # a problem of a whole block (a model validator) is reported at the block's key
        line = line_of(lines, loc)
        found.append((line, f"{f'{path}:{line}' if line else path}: {dotted(loc)}: {_message(error, root)}"))
    return "\n".join(text for _, text in sorted(found, key=lambda item: item[0]))


def yaml_problem(exc: yaml.YAMLError, path: Path) -> str:
    """PyYAML's error as one line: `<file>:<line>: not valid YAML: <problem>`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    return f"{where}: not valid YAML: {problem}"


def line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of the longest leading part of `loc` the file has (`key_lines`); 0 where none."""
    return next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 0)


def at_line(problem: str, path: Path, lines: dict[Loc, int]) -> str:
    """`problem` (`a.b.c: what`, or text without a field path) as `<file>:<line>: ...` (`line_of` its path);
    without a line, at the file alone."""
    head = problem.split(":", 1)[0] if ": " in problem else ""
    line = line_of(lines, tuple(head.split("."))) if head and " " not in head else 0
    return f"{path}:{line}: {problem}" if line else f"{path}: {problem}"
