"""Tables for reports, stats and listings (rendered with rich, as plain text or to a console)."""

from __future__ import annotations

from typing import Any, Sequence


def build_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = ""):
    from rich.table import Table

    table = Table(title=title, caption=caption or None, title_justify="left", caption_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, overflow="fold", no_wrap=i == 0)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def render_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", width: int = 120) -> str:
    """The table as plain text (no colours), for ``__str__``."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(build_table(title, header, rows, caption))
    return buf.getvalue().rstrip("\n")
