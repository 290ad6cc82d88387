"""Shared pytest fixtures.

Storage/event-source fixtures (moto S3+SQS server, real Redis) live in the block
below; other fixture groups are appended in their own blocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Engine, delete
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, make_session_factory, upgrade_database
from worker.schema import Base

try:
    from tests.s3_server import dummy_aws_environment, free_port, reset_moto, running_moto_server
except ModuleNotFoundError:  # pytest put tests/ itself on sys.path (no tests/__init__.py)
    from s3_server import dummy_aws_environment, free_port, reset_moto, running_moto_server

# ---------------------------------------------------------------- storage and event sources

REDIS_TEST_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3+SQS server on 127.0.0.1, with dummy AWS credentials in the env."""
    with dummy_aws_environment(), running_moto_server() as endpoint_url:
        yield endpoint_url


@pytest.fixture
def s3_endpoint(s3_server: str) -> str:
    """The moto endpoint, emptied first so each test starts without buckets or queues."""
    reset_moto(s3_server)
    return s3_server


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens, to simulate an outage."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_port()


def _start_local_redis() -> None:
    """Start a throw-away redis-server on 127.0.0.1:6379 (no persistence) if the binary exists."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("Redis is not running on 127.0.0.1:6379 and redis-server is not installed")
    command = [binary, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379"]
    command += ["--save", "", "--appendonly", "no"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=10,
    )


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    """A client of the real Redis on 127.0.0.1:6379, started if it is not running."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=10, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        _start_local_redis()
        deadline = time.monotonic() + 5
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    yield client
    client.close()


@pytest.fixture
def redis_list_key(redis_client: redis.Redis) -> Iterator[str]:
    """A unique Redis key for one test; it and any ``<key>:*`` helper keys are deleted afterwards."""
    key = f"waferwatch-test:{uuid.uuid4().hex}"
    yield key
    leftovers = [key, *redis_client.scan_iter(match=f"{key}:*")]
    redis_client.delete(*leftovers)


# ---------------------------------------------------------------- results database (SQLite and PostgreSQL)
# Real databases, no mocks. PostgreSQL: a throw-away database per test session on the server at
# WAFERWATCH_TEST_PG_ADMIN_URL (default postgres@127.0.0.1:5432, trust auth), started with pg_ctlcluster
# when it is down, dropped at the end. Without a server the PostgreSQL cases skip, unless
# WAFERWATCH_TEST_REQUIRE_PG=1 makes that an error. Tables are emptied before each test that uses
# ``db_engine``/``session_factory``; the migrated schema is made once per session and backend.

PG_ADMIN_URL = os.environ.get("WAFERWATCH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _start_local_postgres() -> None:
    """Start the local Debian cluster (``pg_ctlcluster <version> main start``) when it exists."""
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").is_dir() else []
    binary = shutil.which("pg_ctlcluster")
    if binary is None or not versions:
        return
    command = [binary, "--skip-systemctl-redirect", versions[-1].name, "main", "start"]
    subprocess.run(command, check=False, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """Connection URL of the ``postgres`` maintenance database on a running server (started if down)."""
    if not _pg_reachable():
        _start_local_postgres()
        deadline = time.monotonic() + 20
        while not _pg_reachable() and time.monotonic() < deadline:
            time.sleep(0.2)
    if not _pg_reachable():
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}"
        if os.environ.get("WAFERWATCH_TEST_REQUIRE_PG") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def pg_database_factory(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """Call it to create an empty database ``waferwatch_test_<random>``; all are dropped at the end."""
    created: list[str] = []

    def create() -> str:
        name = f"waferwatch_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = make_url(pg_admin_url).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    yield create
    with psycopg.connect(pg_admin_url, autocommit=True) as connection:
        for name in created:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database_factory: Callable[[], str]) -> str:
    """URL of a session-wide PostgreSQL database migrated to head."""
    url = pg_database_factory()
    upgrade_database(url)
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URL of a session-wide SQLite file database migrated to head."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'waferwatch.db'}"
    upgrade_database(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database URL; tests using it run once per backend."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture(scope="session")
def _db_engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def db_engine(db_url: str, _db_engines: dict[str, Engine]) -> Engine:
    """An engine on ``db_url`` (one per backend per session) whose tables have just been emptied."""
    engine = _db_engines.get(db_url)
    if engine is None:
        engine = _db_engines[db_url] = make_engine(db_url)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(delete(table))
    return engine


@pytest.fixture
def session_factory(db_engine: Engine) -> sessionmaker[Session]:
    """A session factory on the emptied database of ``db_engine`` (use it with ``session_scope``)."""
    return make_session_factory(db_engine)
