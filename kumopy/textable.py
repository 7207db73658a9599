"""Plain-text tables for command output (left-aligned columns)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["columns", "table"]


def columns(rows: Sequence[Sequence[object]], indent: str = "") -> list[str]:
    """Return rows as left-aligned columns, one string per row."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def table(rows: Sequence[Sequence[object]], head: Sequence[str]) -> str:
    """Return a table with a header line and a rule under it."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    rule = ["-" * w for w in widths]
    return "\n".join(columns([list(head), rule, *rows]))
