"""Tables for people: the identifying column (an image id, a model version, a key) is never cut.

Rich's default is to shorten every column with "…" when a table is wider than the terminal, which turns
``TEST_093`` into ``TEST_…`` and a version into ``9c5cca…`` at 80 columns: exactly the value a reader
needs to copy into the next command. Here the first column is as wide as its longest value and never
wraps; the other columns wrap (``fold``) instead of losing characters.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["identified_table", "print_table"]


def identified_table(key: str, *columns: str, keys: Sequence[str] = (), title: str | None = None) -> Table:
    """A table whose first column ``key`` is never truncated (``keys``: its values, to size it up front)."""
    width = max([len(key), *(len(value) for value in keys)])
    table = Table(title=title)
    table.add_column(key, no_wrap=True, min_width=width, overflow="fold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` to stdout (or ``console``): command output goes to stdout so it can be piped."""
    (console or Console()).print(table)
