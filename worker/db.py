"""Engines, sessions and migrations for the results database.

Nothing here reads settings: callers pass the URL (from :func:`worker.settings.get_settings` at an
entry point, or a test fixture). The unit of work is :func:`session_scope`; repository functions run
inside it and never commit themselves.

SQLite (the embedded mode) gets the settings that make several worker *processes* safe on one file:
WAL journaling (readers never block the writer), a busy timeout, foreign keys, and ``BEGIN IMMEDIATE``
transactions, so a transaction that reads then writes takes the write lock up front instead of failing
with "database is locked" when it tries to upgrade a stale read snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import DatabaseUnavailableError
from worker.settings import normalize_database_url

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "alembic_config",
    "current_revision",
    "dispose_engine_after_fork",
    "downgrade_database",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "normalize_database_url",
    "session_scope",
    "upgrade_database",
]

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("mode"):
        return None
    return Path(database)


def make_engine(
    url: str,
    *,
    echo: bool = False,
    sqlite_foreign_keys: bool = True,
    sqlite_begin: str = "IMMEDIATE",
    **kwargs: Any,
) -> Engine:
    """Create an engine for ``url`` with the per-backend settings described in the module docstring.

    For a SQLite file, the parent directory is created here (on use, never at import).
    ``sqlite_foreign_keys=False`` is for Alembic's batch mode, which copies and drops tables and must
    not trip or cascade foreign keys while doing so. ``sqlite_begin`` is ``"IMMEDIATE"`` (default),
    ``"DEFERRED"`` or ``"EXCLUSIVE"``. Extra ``kwargs`` go to :func:`sqlalchemy.create_engine`.
    """
    url = normalize_database_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        db_file = _sqlite_file(url)
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)
            connect_args["check_same_thread"] = False
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(url, echo=echo, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, foreign_keys=sqlite_foreign_keys, wal=db_file is not None, begin=sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, echo=echo, **kwargs)


def _install_sqlite_hooks(engine: Engine, *, foreign_keys: bool, wal: bool, begin: str) -> None:
    """Per-connection pragmas and explicit BEGIN for pysqlite (see SQLAlchemy's pysqlite notes).

    pysqlite's own transaction handling is disabled (``isolation_level = None``) and SQLAlchemy's
    ``begin`` event emits the BEGIN instead, which also makes SAVEPOINT and transactional DDL work.
    """
    begin = begin.upper()
    if begin not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE, got {begin!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(f"BEGIN {begin}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``.

    ``expire_on_commit=False`` so rows returned from a unit of work stay readable after its commit
    (a task commits, then enqueues follow-up work using ids it already holds).
    """
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception, always close.

    Exceptions are re-raised, except that a lost or refused connection (and SQLite's "database is
    locked" after the busy timeout) becomes :class:`~worker.errors.DatabaseUnavailableError`, a
    transient error the task retries with backoff. Constraint violations and other errors pass through
    unchanged.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except (OperationalError, InterfaceError) as exc:
        session.rollback()
        raise DatabaseUnavailableError(f"results database unavailable: {exc.orig or exc}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engine_after_fork(engine: Engine) -> None:
    """Forget the pooled connections inherited from the parent process, without closing them.

    Call it in the child after a fork (Celery's ``worker_process_init``)::

        worker_process_init.connect(lambda **_: dispose_engine_after_fork(engine), weak=False)

    ``close=False`` leaves the parent's sockets alone; closing them from the child would break the
    parent's connections. The child then opens its own connections on first use.
    """
    engine.dispose(close=False)


# --- migrations ----------------------------------------------------------------------------------


def _migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic ``Config`` for ``url`` that works from any directory and from an installed wheel.

    The script location is the directory of the installed ``migrations`` package rather than a path
    relative to the working directory, and no ``alembic.ini`` is needed.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    # ConfigParser interpolates '%', which appears in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (idempotent: already there is a no-op)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops every table)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None when it has never been migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, sqlite_begin="DEFERRED")
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this version of waferwatch."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(_migrations_dir())).get_current_head()
