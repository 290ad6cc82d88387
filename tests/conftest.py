"""Shared pytest fixtures.

Storage/event-source fixtures (moto S3+SQS server, real Redis) live in the block
below; other fixture groups are appended in their own blocks.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


# ---------------------------------------------------------------- report history (views and reports)
# A small, fully specified history on the emptied database of ``session_factory``: two model versions,
# three days with a gap (2026-03-04 has nothing), lots L1 (defects), L2 (no defects), L3, tools T1/T2,
# a rescored image, a nominal image, a queued image, and labels (one image relabelled). Tests assert the
# exact counts, rates and percentiles constructed here.


def _report_time(day: int, hour: int, second: float = 0.0) -> datetime:
    return datetime(2026, 3, day, hour, 0, 0, tzinfo=UTC) + timedelta(seconds=second)


@dataclass
class ReportHistory:
    """Handles to the inserted history: image ids by name and the heatmap bytes by key."""

    image_ids: dict[str, int]
    heatmaps: dict[str, bytes]


def _heatmap_png(seed: int) -> bytes:
    from PIL import Image as PILImage

    width, height = 96, 96
    pixels = bytearray()
    for y in range(height):
        for x in range(width):
            hot = max(0, 255 - 4 * (abs(x - 30 - seed * 7) + abs(y - 50 + seed * 3)))
            pixels += bytes((min(255, 60 + hot), 60 + (x + y) % 40, max(0, 160 - hot)))
    out = io.BytesIO()
    PILImage.frombytes("RGB", (width, height), bytes(pixels)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def report_history(session_factory: sessionmaker[Session]) -> ReportHistory:
    from worker.db import session_scope
    from worker.schema import Image, Inference, Label, ModelVersion

    # (name, day, lot, wafer, tool, score under mv-2, queue lag in seconds)
    images = [
        ("a1", 2, "L1", "W1", "T1", 0.2, 1.0),
        ("a2", 2, "L1", "W1", "T1", 0.4, 2.0),
        ("a3", 2, "L1", "W1", "T1", 0.7, 3.0),
        ("a4", 2, "L1", "W1", "T1", 0.9, 4.0),
        ("b1", 3, "L1", "W2", "T2", 0.65, 10.0),
        ("b2", 3, "L1", "W2", "T2", 0.1, 20.0),
        ("c1", 3, "L2", "W1", "T1", 0.1, 30.0),
        ("c2", 3, "L2", "W1", "T1", 0.2, 30.0),
        ("c3", 3, "L2", "W1", "T1", 0.3, 60.0),
        ("d1", 5, "L3", "W7", "T2", 0.95, 5.0),
    ]
    ids: dict[str, int] = {}
    heatmaps: dict[str, bytes] = {}
    with session_scope(session_factory) as session:
        session.add_all(
            [
                ModelVersion(id="mv-1", threshold=0.5, status="retired", created_at=_report_time(1, 0)),
                ModelVersion(id="mv-2", threshold=0.6, status="active", created_at=_report_time(1, 1)),
            ]
        )
        session.flush()
        for index, (name, day, lot, wafer, tool, score, lag) in enumerate(images):
            seen = _report_time(day, 10, index * 60)
            image = Image(
                bucket="fab",
                key=f"incoming/{tool}/{lot}/{wafer}/{name}.png",
                etag_or_version=f"etag-{name}",
                size=1000,
                meta={"lot": lot, "wafer": wafer, "tool": tool},
                lot=lot,
                wafer=wafer,
                tool=tool,
                kind="incoming",
                first_seen_at=seen,
                status="scored",
                status_changed_at=seen + timedelta(seconds=lag),
            )
            session.add(image)
            session.flush()
            ids[name] = image.id
            heatmap_key = f"heatmaps/mv-2/{name}.png"
            if score >= 0.6:
                heatmaps[heatmap_key] = _heatmap_png(index)
            session.add(
                Inference(
                    image_id=image.id,
                    model_version="mv-2",
                    score=score,
                    threshold=0.6,
                    is_anomalous=score >= 0.6,
                    fold_scores=[score] * 5,
                    heatmap_key=heatmap_key,
                    download_ms=5.0,
                    decode_ms=2.0,
                    model_ms=20.0,
                    # a1 was first scored by mv-1 (below) and rescored by mv-2 an hour later
                    created_at=seen + timedelta(seconds=3600 if name == "a1" else lag),
                )
            )
        session.add(
            Inference(
                image_id=ids["a1"],
                model_version="mv-1",
                score=0.1,
                threshold=0.5,
                is_anomalous=False,
                fold_scores=[0.1] * 5,
                created_at=_report_time(2, 10, 1.0),
            )
        )
        nominal = Image(
            bucket="fab", key="nominal/T1/L9/W1/n1.png", etag_or_version="etag-n1", meta={}, lot="L9",
            wafer="W1", tool="T1", kind="nominal", first_seen_at=_report_time(3, 12), status="scored",
            status_changed_at=_report_time(3, 12, 2.0),
        )  # fmt: skip
        queued = Image(
            bucket="fab", key="incoming/T1/L1/W1/q1.png", etag_or_version="etag-q1", meta={}, lot="L1",
            wafer="W1", tool="T1", kind="incoming", first_seen_at=_report_time(3, 13), status="queued",
            status_changed_at=_report_time(3, 13),
        )  # fmt: skip
        session.add_all([nominal, queued])
        session.flush()
        ids["n1"], ids["q1"] = nominal.id, queued.id
        session.add(
            Inference(
                image_id=nominal.id, model_version="mv-2", score=0.05, threshold=0.6, is_anomalous=False,
                fold_scores=[0.05] * 5, created_at=_report_time(3, 12, 2.0),
            )
        )  # fmt: skip
        # Reviews: a4 defect (confirmed), a3 good (false alarm), c3 defect (miss), c1 defect then good
        # (latest wins: confirmed good), a1 good (agrees with mv-1 and mv-2).
        for name, verdict, minute in [
            ("a4", "defect", 0),
            ("a3", "good", 0),
            ("c3", "defect", 0),
            ("c1", "defect", 0),
            ("c1", "good", 30),
            ("a1", "good", 0),
        ]:
            session.add(
                Label(image_id=ids[name], verdict=verdict, author="eng", created_at=_report_time(6, 9, minute * 60))
            )
    return ReportHistory(ids, heatmaps)


# ---------------------------------------------------------------- pipeline (scoring, tasks, end to end)
# One small model trained once per session on 20 real Dacon training images (about 12 s on 2 cores),
# shared by the scoring, task, reconciliation and end-to-end tests. Skips without the dataset.


@pytest.fixture(scope="session")
def dacon_data() -> Path:
    """The Dacon semiconductor folder (train.csv, test.csv, train/, test/)."""
    from bench.magnetic_tile import DATASETS

    path = DATASETS / "dacon-semiconductor"
    if not (path / "train.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI: the pipeline tests must run there")
        pytest.skip(f"{path} not present on this machine (set WAFERWATCH_DATASETS)")
    return path


@pytest.fixture(scope="session")
def pipeline_model_dir(dacon_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved small model (20 training images, coreset 2 %, 2 folds) for pipeline tests.

    Its decisions are pinned to the max over folds at a 5% target, the settings the retraining tests' gate
    margins were measured with: a 20-image, 2-fold model is close to chance on synthetic anomalies, and at
    the product's 15% target its held-out flag rate and synthetic recall both saturate on the 9 held-out
    images those tests have, so nothing could tell a damaged candidate from a clean one."""
    from models import FoldEnsemble, PatchCoreConfig
    from models.datasets import read_image_csv

    refs = sorted(read_image_csv(dacon_data / "train.csv"), key=lambda ref: ref.id)[:20]
    config = PatchCoreConfig(coreset_ratio=0.02, folds=2, score_aggregate="max", false_alarm_rate=0.05)
    ensemble = FoldEnsemble.fit([ref.id for ref in refs], [ref.path for ref in refs], config, device="cpu")
    return ensemble.save(tmp_path_factory.mktemp("pipeline-model") / "model")


@pytest.fixture(scope="session")
def dacon_test_images(dacon_data: Path) -> list[Path]:
    """Paths of the real Dacon test images, sorted by id."""
    from models.datasets import read_image_csv

    return [ref.path for ref in sorted(read_image_csv(dacon_data / "test.csv"), key=lambda ref: ref.id)]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[object]:
    """A redis-server of the test's own on a free port (tests/faults/processes.PrivateRedis), so killing or
    restarting it, or the workers and broadcasts on it, touch nobody else."""
    try:
        from tests.faults.processes import PrivateRedis
    except ModuleNotFoundError:  # run from inside tests/
        from faults.processes import PrivateRedis
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()
