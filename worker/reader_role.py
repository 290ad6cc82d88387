"""The read-only PostgreSQL role that ``waferwatch report sql`` runs as.

A statement checked by :mod:`worker.sql_guard` can still be dangerous if the parser and PostgreSQL ever
disagree about it, and a superuser can reach the server's files and programs (``COPY … TO PROGRAM``,
``pg_read_file``) even inside a read-only transaction. So report queries run as a role that can do
nothing but read our tables and views: no superuser, no role creation, no membership of
``pg_read_server_files``, ``pg_write_server_files``, ``pg_execute_server_program`` or
``pg_signal_backend``, ``SELECT`` on the tables and views of our schema only (also the ones later
migrations add, through default privileges), and every session read-only by default.

:func:`create_reader_role` is idempotent: run again (after a migration added a table, or to reset a
password) it re-applies the same attributes and grants. :func:`privilege_warnings` tells a caller that
the role it connects as is more than a reader.
"""

from __future__ import annotations

import re
from typing import Any, Final

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

__all__ = ["DANGEROUS_ROLES", "DEFAULT_READER_ROLE", "create_reader_role", "privilege_warnings"]

DEFAULT_READER_ROLE: Final = "waferwatch_reader"

DANGEROUS_ROLES: Final = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
    "pg_write_all_data",
)
"""Predefined roles whose members reach beyond our tables; a reader must belong to none of them."""

_ROLE_NAME_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _libpq_url(url: str) -> str:
    """The SQLAlchemy URL as psycopg (libpq) takes it: no ``+driver`` in the scheme."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"a reader role needs PostgreSQL, not {parsed.get_backend_name()!r}; check --url")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_reader_role(url: str, *, name: str = DEFAULT_READER_ROLE, password: str | None = None) -> str:
    """Create (or reset) the reader role ``name`` on the database of ``url``; returns the schema granted.

    ``url`` must connect as a role that may create roles and grant on our tables (an administrator, or the
    application's role if it may create roles); default privileges are set for that role and for the owners
    of our tables, so tables a later migration creates are readable too.

    Raises:
        ValueError: ``name`` is not a plain lower-case identifier, or ``url`` is not PostgreSQL.
        PermissionError: after the grants, the role is still a superuser or a member of a dangerous role
            (granted through another role; revoke that by hand).
    """
    if not _ROLE_NAME_RE.match(name):
        raise ValueError(f"reader role name {name!r} must be a lower-case identifier (letters, digits, _)")
    role = sql.Identifier(name)
    attributes = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT")
    with psycopg.connect(_libpq_url(url), autocommit=True) as connection:
        database, schema = connection.execute("SELECT current_database(), current_schema()").fetchone() or ("", "")
        exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        verb = sql.SQL("ALTER ROLE") if exists else sql.SQL("CREATE ROLE")
        statement = sql.SQL("{} {} {}").format(verb, role, attributes)
        if password is not None:
            statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(password))
        with connection.transaction():
            connection.execute(statement)
            for dangerous in DANGEROUS_ROLES:
                member = connection.execute(
                    "SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                    "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = %s AND u.rolname = %s",
                    (dangerous, name),
                ).fetchone()
                if member:
                    connection.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(dangerous), role))
            connection.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role))
            connection.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), role))
            connection.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(sql.Identifier(schema), role)
            )
            for owner in _table_owners(connection, schema):
                connection.execute(
                    sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
                        sql.Identifier(owner), sql.Identifier(schema), role
                    )
                )
            connection.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role))
    warnings = privilege_warnings(url, role=name)
    if warnings:
        raise PermissionError(f"reader role {name!r} is not read-only: {'; '.join(warnings)}")
    return schema


def _table_owners(connection: psycopg.Connection[Any], schema: str) -> list[str]:
    """The roles whose future tables the reader should see: the current role and the owners of our tables
    and views (those the current role may act for; a superuser may for all, e.g. the app role that runs
    the migrations)."""
    rows = connection.execute(
        "SELECT owner FROM (SELECT tableowner AS owner FROM pg_tables WHERE schemaname = %s "
        "UNION SELECT viewowner FROM pg_views WHERE schemaname = %s UNION SELECT current_user) o "
        "WHERE pg_has_role(current_user, owner, 'USAGE') ORDER BY owner",
        (schema, schema),
    ).fetchall()
    return [str(row[0]) for row in rows]


def privilege_warnings(url: str, *, role: str | None = None) -> list[str]:
    """What ``role`` (default: the role ``url`` logs in as) may do beyond reading; empty for a reader.

    Returns an empty list for databases other than PostgreSQL (SQLite has no roles).
    """
    if make_url(url).get_backend_name() != "postgresql":
        return []
    with psycopg.connect(_libpq_url(url), autocommit=True) as connection:
        name = role or str((connection.execute("SELECT current_user").fetchone() or ("",))[0])
        row = connection.execute(
            "SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
        if row is None:
            return [f"role {name!r} does not exist"]
        warnings = [
            label
            for flag, label in zip(row, ("is a superuser", "may create roles", "bypasses row security"), strict=True)
            if flag
        ]
        for dangerous in DANGEROUS_ROLES:
            member = connection.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (name, dangerous)).fetchone()
            if member and member[0]:
                warnings.append(f"is a member of {dangerous}")
    return [f"{name} {warning}" for warning in warnings]
