"""One rebuild at a time, whoever starts it (two beat processes, a manual ``waferwatch retrain``).

A rebuild runs as a Celery canvas over several tasks and processes, so no single connection lives as
long as the build. Exclusion therefore has two parts:

* :func:`rebuild_lock` serialises the short *decide-and-claim* step of every trigger: on PostgreSQL a
  session-level ``pg_try_advisory_lock`` on a dedicated connection (held until the block ends, released
  even if the process dies, because PostgreSQL drops the lock with the session); on SQLite (the embedded
  mode, one machine) an exclusive ``fcntl.flock`` on ``<database>.rebuild.lock``. A trigger that does not
  get the lock does nothing: someone else is deciding right now.
* inside the lock, the claim is a ``model_versions`` row with status ``building`` (see
  :func:`scheduler.rebuild.claim_build`): while one exists and its heartbeat is younger than the lease,
  no other build starts. The row is the lease that spans the whole canvas and shows its progress.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

__all__ = ["REBUILD_LOCK_NAME", "advisory_key", "file_lock", "pg_advisory_lock", "rebuild_lock", "sqlite_lock_path"]

REBUILD_LOCK_NAME = "waferwatch.rebuild"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_try_advisory_lock`` derived from ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def pg_advisory_lock(engine: Engine, name: str = REBUILD_LOCK_NAME) -> Iterator[bool]:
    """Try the session advisory lock ``name`` on a dedicated connection; yield whether it was taken.

    The connection is held (outside any pool transaction) for the whole block, and the lock is
    released explicitly at the end; if the process dies, PostgreSQL releases it with the session.
    """
    key = advisory_key(name)
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one())
        try:
            yield taken
        finally:
            if taken:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Try an exclusive, non-blocking ``flock`` on ``path``; yield whether it was taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def sqlite_lock_path(url: str) -> Path:
    """Where the embedded mode's rebuild lock file lives: next to the database file."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return Path("var") / "rebuild.lock"
    return Path(database).with_name(Path(database).name + ".rebuild.lock")


@contextmanager
def rebuild_lock(engine: Engine) -> Iterator[bool]:
    """The rebuild lock for ``engine``'s database: advisory lock on PostgreSQL, file lock on SQLite."""
    if engine.dialect.name == "postgresql":
        with pg_advisory_lock(engine) as taken:
            yield taken
    else:
        with file_lock(sqlite_lock_path(engine.url.render_as_string(hide_password=False))) as taken:
            yield taken
