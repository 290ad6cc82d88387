"""The Alembic migrations on real PostgreSQL and SQLite: round trips, parity with the models, entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from worker.db import current_revision, downgrade_database, head_revision, make_engine, upgrade_database
from worker.schema import Base

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_TABLES = {"images", "model_versions", "inferences", "failures", "labels"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A brand-new, never-migrated database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    factory: Callable[[], str] = request.getfixturevalue("pg_database_factory")
    return factory()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None

    upgrade_database(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    assert _tables(empty_db_url) >= APP_TABLES

    downgrade_database(empty_db_url, "base")
    assert current_revision(empty_db_url) is None
    assert not _tables(empty_db_url) & APP_TABLES

    upgrade_database(empty_db_url)
    upgrade_database(empty_db_url)  # already at head: a no-op, not an error
    assert current_revision(empty_db_url) == head_revision()


def test_migrated_schema_matches_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_one_active_model_version_index_is_partial_and_unique(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        indexes = {index["name"]: index for index in inspect(engine).get_indexes("model_versions")}
    finally:
        engine.dispose()
    index = indexes["uq_model_versions_one_active"]
    assert index["unique"]
    dialect_options = index.get("dialect_options", {})
    where = dialect_options.get("postgresql_where") or dialect_options.get("sqlite_where")
    assert "active" in str(where)


def test_upgrade_database_works_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = "sqlite:///nested/dir/waferwatch.db"  # relative to the CWD; the parent is created on use
    upgrade_database(url)
    assert (elsewhere / "nested" / "dir" / "waferwatch.db").is_file()
    assert current_revision(url) == head_revision()


def _alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_command_line_from_repo_root(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAFERWATCH_")}
    from_settings = tmp_path / "from_settings.db"
    result = _alembic("upgrade", "head", env={**env, "WAFERWATCH_DATABASE_URL": f"sqlite:///{from_settings}"})
    assert result.returncode == 0, result.stderr
    assert current_revision(f"sqlite:///{from_settings}") == head_revision()

    from_x = tmp_path / "from_x.db"
    result = _alembic("-x", f"url=sqlite:///{from_x}", "upgrade", "head", env=env)
    assert result.returncode == 0, result.stderr
    assert current_revision(f"sqlite:///{from_x}") == head_revision()
    result = _alembic("-x", f"url=sqlite:///{from_x}", "downgrade", "base", env=env)
    assert result.returncode == 0, result.stderr
    assert current_revision(f"sqlite:///{from_x}") is None


def test_waferwatch_db_commands(tmp_path: Path) -> None:
    cli = pytest.importorskip("worker.cli", reason="the CLI package does not import yet", exc_type=ImportError)
    from typer.testing import CliRunner

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    result = runner.invoke(cli.app, ["db", "upgrade", "--url", url])
    assert result.exit_code == 0, result.output
    assert current_revision(url) == head_revision()
    result = runner.invoke(cli.app, ["db", "current", "--url", url])
    assert result.exit_code == 0, result.output
    assert head_revision() in result.stdout
    result = runner.invoke(cli.app, ["db", "downgrade", "base", "--url", url])
    assert result.exit_code == 0, result.output
    assert current_revision(url) is None


def test_registry_history_revision_adds_events_and_the_pooled_state(empty_db_url: str) -> None:
    """0005: ``model_events`` exists, ``pooled`` passes the images CHECK, the views and indexes survive the
    SQLite table rebuild, and a downgrade turns pooled images back into queued ones."""
    from sqlalchemy import text

    upgrade_database(empty_db_url)
    assert "model_events" in _tables(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO images (bucket, key, etag_or_version, metadata, kind, status) "
                     "VALUES ('b', 'nominal/a.png', 'e', '{}', 'nominal', 'pooled')")
            )  # fmt: skip
            assert connection.execute(text("SELECT count(*) FROM v_latest_inference")).scalar_one() == 0
        indexes = {index["name"] for index in inspect(engine).get_indexes("images")}
        assert {"ix_images_status", "ix_images_first_seen_at"} <= indexes
    finally:
        engine.dispose()
    downgrade_database(empty_db_url, "0002_views")
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT status FROM images")).scalar_one() == "queued"
        assert "model_events" not in set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_leases_revision_adds_the_lease_columns_and_survives_a_downgrade(empty_db_url: str) -> None:
    """0006: ``claimed_by``, ``lease_until``, ``redrives`` (default 0) and the partial lease index; the
    downgrade drops them and keeps the rows (and the views, rebuilt by SQLite's batch mode)."""
    from sqlalchemy import text

    upgrade_database(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        columns = {column["name"] for column in inspect(engine).get_columns("images")}
        assert {"claimed_by", "lease_until", "redrives"} <= columns
        assert "ix_images_lease_until" in {index["name"] for index in inspect(engine).get_indexes("images")}
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO images (bucket, key, etag_or_version, metadata, kind, status) "
                     "VALUES ('b', 'incoming/a.png', 'e', '{}', 'incoming', 'queued')")
            )  # fmt: skip
            assert connection.execute(text("SELECT redrives FROM images")).scalar_one() == 0
    finally:
        engine.dispose()
    downgrade_database(empty_db_url, "0005_registry_history")
    engine = make_engine(empty_db_url)
    try:
        assert "claimed_by" not in {column["name"] for column in inspect(engine).get_columns("images")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM images")).scalar_one() == 1
            assert connection.execute(text("SELECT count(*) FROM v_latest_inference")).scalar_one() == 0
    finally:
        engine.dispose()


def test_anomaly_maps_revision_adds_the_map_columns_and_survives_a_downgrade(empty_db_url: str) -> None:
    """0007: ``anomaly_map_png`` (bytes), ``anomaly_map_low`` and ``anomaly_map_high`` on ``inferences``; the
    downgrade drops them and keeps the rows and the views."""
    from sqlalchemy import text

    upgrade_database(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        columns = {column["name"] for column in inspect(engine).get_columns("inferences")}
        assert {"anomaly_map_png", "anomaly_map_low", "anomaly_map_high", "heatmap_key"} <= columns
    finally:
        engine.dispose()
    downgrade_database(empty_db_url, "0006_leases")
    engine = make_engine(empty_db_url)
    try:
        assert "anomaly_map_png" not in {column["name"] for column in inspect(engine).get_columns("inferences")}
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM v_latest_inference")).scalar_one() == 0
    finally:
        engine.dispose()
