"""Alembic environment: where the URL comes from and how each backend is migrated.

The URL is, in order: ``alembic -x url=...``, the ``sqlalchemy.url`` option when a caller set it
programmatically (:func:`worker.db.alembic_config`), then ``worker.settings.get_settings()``, the
same settings every other entry point reads. ``alembic.ini`` deliberately sets no URL.

SQLite is migrated in batch mode (``render_as_batch``: copy-and-move for ALTERs it lacks) with foreign
keys off, as batch mode requires.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import make_url

from worker.db import make_engine, normalize_database_url
from worker.schema import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    if x_url:
        return normalize_database_url(x_url)
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return normalize_database_url(configured)
    from worker.settings import get_settings

    return get_settings().database_url


def _configure_options(url: str) -> dict[str, object]:
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    return {
        "target_metadata": target_metadata,
        "render_as_batch": is_sqlite,
        "compare_type": True,
        # worker.db runs SQLite with explicit BEGINs, so its DDL is transactional too: a failed
        # migration leaves no half-made tables behind.
        "transactional_ddl": True,
    }


def run_migrations_offline() -> None:
    """Emit the SQL to stdout instead of running it (``alembic upgrade head --sql``)."""
    url = _database_url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_configure_options(url))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Connect and migrate; NullPool because this engine lives for one command."""
    url = _database_url()
    engine = make_engine(url, sqlite_foreign_keys=False, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_configure_options(url))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
