"""Row 9 of the fault suite: `waferwatch report sql` can only read, on the real PostgreSQL.

Before the fix, ``COPY (SELECT 1) TO PROGRAM 'touch marker'`` ran the program on the database server (a
read-only transaction does not stop it) and only then printed "refused"; ``pg_read_file`` returned server
files. Now the statement is parsed before it runs (one SELECT, no COPY, no server-file/program/admin
function), and ``waferwatch db create-reader`` makes a role that cannot reach the server even if a statement
slipped past the parser. Every CLI call is a real subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

CLI = [sys.executable, "-c", "from worker.cli import main; main()"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *args], env=environment, capture_output=True, text=True, timeout=120, check=False)


def _libpq(url: str, **changes: str) -> str:
    return make_url(url).set(drivername="postgresql", **changes).render_as_string(hide_password=False)


@pytest.fixture
def server_writable_dir() -> Iterator[Path]:
    """A directory the PostgreSQL server's OS user can write to (tmp_path's parents are private)."""
    path = Path(tempfile.mkdtemp(prefix="waferwatch-sql-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def reader_role(pg_url: str) -> Iterator[str]:
    """A fresh role name; the role (and what it was granted in the test database) is dropped afterwards."""
    name = f"ww_reader_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(_libpq(pg_url), autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            connection.execute(f'DROP OWNED BY "{name}"')
            connection.execute(f'DROP ROLE "{name}"')


def test_copy_to_program_is_refused_and_the_program_never_runs(pg_url: str, server_writable_dir: Path) -> None:
    marker = server_writable_dir / "marker"
    written = server_writable_dir / "written.csv"
    statements = [
        f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
        f"copy (select 1) to program 'touch {marker}'",
        f"COPY images TO '{written}'",
        f"WITH x AS (SELECT 1) SELECT * FROM x UNION SELECT 1; COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    ]

    for statement in statements:
        result = _cli("report", "sql", statement, "--url", pg_url)

        assert result.returncode != 0, (statement, result.stdout)
        assert "refused" in result.stderr, (statement, result.stderr)
        assert not marker.exists(), f"{statement!r} ran a program on the database server"
        assert not written.exists(), f"{statement!r} wrote a server file"


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT pg_read_file('/etc/hostname')",
        "SELECT pg_catalog.pg_read_binary_file('/etc/hostname')",
        "SELECT \"pg_read_file\"('/etc/passwd')",
        "SELECT * FROM pg_ls_dir('.') AS f",
        "SELECT (SELECT lo_import('/etc/hostname'))",
        "SELECT set_config('statement_timeout', '0', false)",
        "SELECT pg_terminate_backend(pg_backend_pid())",
        "SELECT query_to_xml('SELECT 1', true, true, '')",
        "SELECT * FROM images FOR UPDATE",
        "SELECT * INTO stolen FROM images",
        "WITH gone AS (DELETE FROM images RETURNING id) SELECT count(*) FROM gone",
        "DO $$ BEGIN PERFORM 1; END $$",
        "EXPLAIN ANALYZE SELECT 1",
    ],
)
def test_server_file_program_and_admin_functions_are_refused(pg_url: str, statement: str) -> None:
    result = _cli("report", "sql", statement, "--url", pg_url, "-f", "json")

    assert result.returncode != 0, result.stdout
    assert "refused" in result.stderr
    assert result.stdout == ""


def test_queries_still_run(pg_url: str) -> None:
    result = _cli(
        "report",
        "sql",
        "WITH d AS (SELECT * FROM v_defects_daily) SELECT count(*) AS n FROM d UNION ALL SELECT count(*) FROM images",
        "--url",
        pg_url,
        "-f",
        "csv",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "n"


def test_create_reader_makes_a_role_that_can_only_read(pg_url: str, reader_role: str) -> None:
    created = _cli(
        "db", "create-reader", "--url", pg_url, "--name", reader_role, env={"WAFERWATCH_READER_PASSWORD": ""}
    )
    again = _cli("db", "create-reader", "--url", pg_url, "--name", reader_role)  # idempotent

    assert created.returncode == 0, created.stderr
    assert again.returncode == 0, again.stderr
    assert reader_role in created.stdout
    admin = _libpq(pg_url)
    with psycopg.connect(admin, autocommit=True) as connection:
        attributes = connection.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin "
            "FROM pg_roles WHERE rolname = %s",
            (reader_role,),
        ).fetchone()
        memberships = [
            row[0]
            for row in connection.execute(
                "SELECT r.rolname FROM pg_roles r WHERE pg_has_role(%s, r.oid, 'MEMBER') AND r.rolname <> %s",
                (reader_role, reader_role),
            )
        ]
    assert attributes == (False, False, False, False, False, True)
    assert memberships == []

    reader = _libpq(pg_url, username=reader_role)
    with psycopg.connect(reader, autocommit=True) as connection:
        assert connection.execute("SELECT count(*) FROM images").fetchone() is not None
        assert connection.execute("SELECT count(*) FROM v_defects_daily").fetchone() is not None
        assert connection.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        # The role guard alone (no parser in the way): the server refuses it files, programs and writes.
        for statement in (
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "SELECT pg_read_file('/etc/hostname')",
            "SELECT lo_import('/etc/hostname')",
        ):
            with pytest.raises(psycopg.Error, match=r"permission denied|must be superuser"):
                connection.execute(statement)
        connection.execute("SET default_transaction_read_only = off")  # any role may; the grants still hold
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("INSERT INTO model_versions (id, threshold, status) VALUES ('x', 0.5, 'retired')")

    as_reader = _cli(
        "report",
        "sql",
        "SELECT count(*) AS n FROM images",
        "-f",
        "csv",
        env={
            "WAFERWATCH_DATABASE_URL": pg_url,
            "WAFERWATCH_REPORT_DATABASE_URL": reader.replace("postgresql://", "postgresql+psycopg://"),
        },
    )
    as_superuser = _cli(
        "report", "sql", "SELECT count(*) AS n FROM images", "-f", "csv", env={"WAFERWATCH_DATABASE_URL": pg_url}
    )

    assert as_reader.returncode == 0, as_reader.stderr
    assert "warning" not in as_reader.stderr
    assert as_superuser.returncode == 0, as_superuser.stderr
    assert "more than a reader" in as_superuser.stderr and "create-reader" in as_superuser.stderr


@pytest.fixture
def app_database(pg_admin_url: str, pg_database_factory: Callable[[], str]) -> Iterator[tuple[str, str, str]]:
    """A database owned by a fresh non-superuser app role: (superuser URL, app URL, reader role name)."""
    suffix = uuid.uuid4().hex[:10]
    app_role, reader = f"ww_app_{suffix}", f"ww_reader_{suffix}"
    admin_url = pg_database_factory()
    database = make_url(admin_url).database
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as connection:
        connection.execute(f'CREATE ROLE "{app_role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
        connection.execute(f'ALTER DATABASE "{database}" OWNER TO "{app_role}"')
    app_url = make_url(admin_url).set(username=app_role).render_as_string(hide_password=False)
    yield admin_url, app_url, reader
    with psycopg.connect(_libpq(pg_admin_url), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (reader, app_role):
            connection.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_app_migrates_as_a_non_superuser_and_the_reader_sees_later_tables(
    app_database: tuple[str, str, str],
) -> None:
    admin_url, app_url, reader = app_database

    migrated = _cli("db", "upgrade", "--url", app_url)
    created = _cli("db", "create-reader", "--url", admin_url, "--name", reader)

    assert migrated.returncode == 0, migrated.stderr
    assert created.returncode == 0, created.stderr
    with psycopg.connect(_libpq(app_url), autocommit=True) as connection:
        connection.execute("CREATE TABLE later_table (x integer)")  # what a later migration would do
        connection.execute("INSERT INTO later_table VALUES (7)")
    with psycopg.connect(_libpq(admin_url, username=reader), autocommit=True) as connection:
        assert connection.execute("SELECT x FROM later_table").fetchall() == [(7,)]
        assert connection.execute("SELECT count(*) FROM images").fetchone() == (0,)
    as_reader = _cli(
        "report",
        "sql",
        "SELECT x FROM later_table",
        "-f",
        "csv",
        env={"WAFERWATCH_REPORT_DATABASE_URL": make_url(admin_url).set(username=reader).render_as_string(False)},
    )
    assert as_reader.returncode == 0, as_reader.stderr
    assert as_reader.stdout.splitlines() == ["x", "7"]
    assert "warning" not in as_reader.stderr
