"""Tables for people: the identifying column (an image id, a model version, a key) is never cut.

Rich's default is to shorten every column with "…" when a table is wider than the terminal, which turns
``TEST_093`` into ``TEST_…`` and a version into ``9c5cca…`` at 80 columns: exactly the value a reader
needs to copy into the next command. Here the first column is as wide as its longest value and never
wraps; the other columns wrap (``fold``) instead of losing characters.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["identified_table", "print_table"]


def identified_table(key: str, *columns: str, title: str | None = None) -> Table:
    """A table whose first column ``key`` is never truncated; print it with :func:`print_table`.

    Every other column wraps (at word boundaries, folding a word only when it must) rather than losing
    characters to "…".
    """
    table = Table(title=title)
    table.add_column(key, overflow="fold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` to stdout (or ``console``), with its first column as wide as its longest cell, so
    the identifying value is whole on one line and the other columns give up their width instead."""
    key = table.columns[0]
    cells = [cell for cell in key.cells if isinstance(cell, str)]
    key.min_width = max([len(str(key.header)), *(len(cell) for cell in cells)])
    key.no_wrap = True
    (console or Console()).print(table)
