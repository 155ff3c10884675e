"""The one fixed-width text table of the project (tuning mismatches, truth tables, sysctl tables, the run summary)."""
from __future__ import annotations

from typing import Iterable, Sequence


def render_table(rows: Iterable[Sequence[object]]) -> str:
    """Rows of cells (the first row is the header) -> left-aligned columns two spaces apart, lines right-stripped."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
