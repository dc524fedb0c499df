"""Plain-text tables for the CLI: padded columns, numbers aligned right."""
from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """`header` and `rows` as lines of columns two spaces apart; the columns in `right` align right."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    return "\n".join(lines)


def predictions_table(rows: Sequence[tuple[str, list[dict]]]) -> str:
    """One line per prediction (IMAGE RANK LABEL SCORE), the image named on its first line only."""
    lines = [(name if rank == 1 else "", rank, p["label"], f"{p['score']:.3f}")
             for name, preds in rows for rank, p in enumerate(preds, 1)]
    return format_table(("IMAGE", "RANK", "LABEL", "SCORE"), lines, right=(1, 3))
