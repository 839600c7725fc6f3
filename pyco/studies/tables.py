"""Markdown tables that render: every cell's ``|`` escaped, newlines folded, one row per line."""

from __future__ import annotations

from collections.abc import Sequence


def escape(cell) -> str:
    """A table cell: ``|`` becomes ``\\|`` (GitHub's escape inside tables), line breaks become spaces."""
    return " ".join(str(cell).replace("\\|", "|").replace("|", "\\|").split())


def markdown(headers: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; every row must have as many cells as ``headers``."""
    width = len(headers)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"table row {i} has {len(row)} cells, the header {width}")
    lines = ["| " + " | ".join(escape(h) for h in headers) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
