"""BENCHMARKS.md is written by several benchmarks; each owns one marked section and replaces only it."""

from __future__ import annotations

from pathlib import Path

HEADER = (
    "# Benchmarks\n\nEvery number here was measured by the `make` target named in its section, on the machine "
    "it names.\n"
)


def update_section(path: Path, name: str, markdown: str, header: str = HEADER) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (appending it if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else header
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
