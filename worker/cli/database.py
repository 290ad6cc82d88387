"""The check every command that reads the results database makes first.

Opening a SQLite URL creates the file, so ``waferwatch report all`` run in the wrong folder used to create
an empty ``var/waferwatch.db`` and then fail with a multi-line ``no such table``. Commands that only read
call :func:`require_migrated` instead: a missing file, a database never migrated or one at another
revision is refused with one line that says what to run, and nothing is created.
"""

from __future__ import annotations

from pathlib import Path

import typer
from sqlalchemy.engine import make_url

from worker.cli.root import console
from worker.settings import HOME_ENV, mask_url

__all__ = ["database_problem", "require_migrated"]

_WHERE = (
    f"for the demo's database pass --workdir runs/demo (or set {HOME_ENV}); "
    "for a new database run `waferwatch db upgrade`"
)


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def database_problem(url: str) -> str | None:
    """What is wrong with the results database at ``url`` for reading (None: it is migrated to head)."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import DBAPIError

    from worker.db import _migrations_dir, current_revision, head_revision

    shown = mask_url(url)
    db_file = _sqlite_file(url)
    if db_file is not None and not db_file.is_file():
        return f"no results database at {db_file}; {_WHERE}"
    try:
        current = current_revision(url)
    except DBAPIError as exc:
        return f"cannot open the results database {shown}: {str(exc.orig or exc).strip().splitlines()[0]}"
    head = head_revision()
    if current is None:
        return f"the results database {shown} has no waferwatch tables (never migrated); {_WHERE}"
    if current != head:
        try:
            known = ScriptDirectory(str(_migrations_dir())).get_revision(current) is not None
        except Exception:  # alembic raises for revisions it does not know
            known = False
        if not known:
            return f"the results database {shown} is at revision {current}, newer than this waferwatch; upgrade it"
        return f"the results database {shown} is at revision {current}, not {head}; run `waferwatch db upgrade`"
    return None


def require_migrated(url: str) -> None:
    """Exit 1 with one line when the database at ``url`` cannot be read (see :func:`database_problem`)."""
    problem = database_problem(url)
    if problem is not None:
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True)
        raise typer.Exit(1)
