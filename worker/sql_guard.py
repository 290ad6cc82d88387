"""Check that a statement typed by a person can only read, before it reaches the database.

``waferwatch report sql`` runs SQL from the command line. The database's own guards (a ``READ ONLY``
transaction, SQLite's ``query_only``) stop writes to tables, but not everything that leaves the database:
``COPY … TO PROGRAM`` runs a shell command on the server, ``COPY … TO 'file'`` writes a server file and
``pg_read_file()`` reads one, all inside a read-only transaction. So the statement is parsed first, by a
real SQL parser (sqlglot, in the dialect of the target database), and refused unless it is

* exactly one statement, a ``SELECT`` (with or without ``WITH``, or a ``UNION``/``INTERSECT``/``EXCEPT`` of
  selects),
* with no data-changing part anywhere in it (a ``DELETE … RETURNING`` in a ``WITH``, ``SELECT … INTO``,
  ``FOR UPDATE``, ``COPY``), and
* calling none of the functions of :data:`DENIED_FUNCTIONS` (server files and programs, large objects,
  other databases, settings, signals to other sessions, sequences, functions that run a query given as
  text).

Anything the parser cannot read is refused too: the check fails closed. It is the first of two guards; the
second is the role the statement runs as (``waferwatch db create-reader``), which holds no privilege to
reach the server's files or programs even if a statement slipped through.
"""

from __future__ import annotations

import re
from typing import Final

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

__all__ = ["DENIED_FUNCTIONS", "DENIED_FUNCTION_PREFIXES", "refusal_reason"]

DENIED_FUNCTIONS: Final = frozenset(
    {
        # server files and programs
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_file_write",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_file_sync",
        "pg_logdir_ls",
        "pg_current_logfile",
        # large objects (lo_import/lo_export read and write server files)
        "lo_import",
        "lo_export",
        "lo_create",
        "lo_creat",
        "lo_unlink",
        "lo_put",
        "lo_from_bytea",
        # settings, sessions and the server
        "set_config",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_notify",
        "pg_logical_emit_message",
        "pg_import_system_collations",
        # sequences and locks change state or block the pipeline (its reconcile takes advisory locks)
        "nextval",
        "setval",
        # functions that run a query passed as text, past this check
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        # SQLite: extensions and the shell's file functions
        "load_extension",
        "readfile",
        "writefile",
        "edit",
        "fts3_tokenizer",
    }
)
"""Functions refused by name (case-insensitive, with or without a schema such as ``pg_catalog.``)."""

DENIED_FUNCTION_PREFIXES: Final = (
    "pg_ls_",  # pg_ls_dir, pg_ls_logdir, pg_ls_waldir, pg_ls_tmpdir, pg_ls_archive_statusdir
    "dblink",  # dblink, dblink_exec, dblink_connect, ...
    "pg_advisory",  # pg_advisory_lock, pg_advisory_xact_lock, ...
    "pg_try_advisory",
    "pg_replication_",  # replication origins
    "pg_create_",  # replication slots, restore points
    "pg_drop_replication",
    "lo_",  # any other large-object function
)
"""Function name prefixes refused as a family."""

_SQLGLOT_DIALECTS: Final = {"postgresql": "postgres", "sqlite": "sqlite"}

# Root statements that only read: a SELECT (WITH is part of it) or a set operation of selects.
_READING_ROOTS: Final = (exp.Select, exp.SetOperation, exp.Subquery)

# Nodes that change something, wherever they sit in the tree (a data-modifying WITH, SELECT INTO ...).
_CHANGING_NODES: Final = tuple(
    getattr(exp, name)
    for name in (
        "Insert",
        "Update",
        "Delete",
        "Merge",
        "Copy",
        "Command",
        "Create",
        "Drop",
        "Alter",
        "TruncateTable",
        "Into",
        "Lock",
        "Set",
        "Transaction",
        "Commit",
        "Rollback",
        "Pragma",
        "Attach",
        "Detach",
        "Grant",
        "Revoke",
        "LoadData",
        "Use",
        "Kill",
        "Analyze",
        "Refresh",
        "Cache",
        "Uncache",
        "Export",
        "Execute",
    )
    if hasattr(exp, name)
)

_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*")


def refusal_reason(statement: str, dialect: str) -> str | None:
    """Why ``statement`` may not run as a read-only report query, or ``None`` when it may.

    ``dialect`` is SQLAlchemy's dialect name (``postgresql`` or ``sqlite``); the statement is parsed as
    that database would read it.
    """
    read = _SQLGLOT_DIALECTS.get(dialect)
    if read is None:
        return f"read-only SQL on {dialect!r} is not supported"
    try:
        trees = [tree for tree in sqlglot.parse(statement, read=read) if tree is not None]
    except SqlglotError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the statement could not be parsed as {dialect} SQL, so it is not run ({first_line})"
    if len(trees) != 1:
        return f"exactly one statement is allowed, got {len(trees)}"
    tree = trees[0]
    if not isinstance(tree, _READING_ROOTS):
        return f"only SELECT (or WITH … SELECT) is allowed, not {_kind(tree)}"
    for node in tree.walk():
        if isinstance(node, _CHANGING_NODES):
            return f"the query contains {_kind(node)}, which is not a read"
    for function in tree.find_all(exp.Func):
        for name in _function_names(function):
            if name in DENIED_FUNCTIONS or name.startswith(DENIED_FUNCTION_PREFIXES):
                return f"function {name}() is not allowed in report queries (it reaches beyond the tables)"
    return None


def _kind(node: exp.Expression) -> str:
    """A short name of what a node is, for the refusal message (``COPY``, ``DELETE``, ``SELECT … INTO``)."""
    if isinstance(node, exp.Command):
        return str(node.this).split()[0].upper() if node.this else "a command"
    if isinstance(node, exp.Into):
        return "SELECT … INTO"
    if isinstance(node, exp.Lock):
        return "a locking clause (FOR UPDATE/SHARE)"
    if isinstance(node, exp.TruncateTable):
        return "TRUNCATE"
    return type(node).__name__.upper()


def _function_names(function: exp.Func) -> set[str]:
    """Every lower-case name a function node may stand for (sqlglot maps some to its own names)."""
    if isinstance(function, exp.Anonymous):
        return {str(function.name).lower()}
    names = {function.sql_name().lower(), *(name.lower() for name in getattr(function, "_sql_names", ()))}
    match = _NAME_RE.match(function.sql(dialect="postgres"))
    if match:
        names.add(match.group(0).lower())
    return names
