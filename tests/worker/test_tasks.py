"""The Celery app and tasks: configuration, and a real worker on the embedded (filesystem) broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker.app import RECONCILE, REDRIVE_LEASES, SCORE_BATCH, create_app, make_enqueue, queue_depth
from worker.db import make_engine, make_session_factory, session_scope
from worker.model_provider import publish_model
from worker.schema import Failure, Image, Inference
from worker.settings import Settings
from worker.storage import FolderStore


def _settings(tmp_path: Path, url: str, **overrides: object) -> Settings:
    return Settings(
        database_url=url,
        broker_url="filesystem://",
        broker_dir=tmp_path / "broker",
        storage="folder",
        storage_root=tmp_path / "storage",
        model_cache_dir=tmp_path / "cache",
        device="cpu",
        **overrides,
    )


def test_app_configuration_and_task_options(tmp_path: Path, sqlite_url: str) -> None:
    settings = _settings(tmp_path, sqlite_url, task_max_attempts=4, retry_backoff_s=3.0, task_time_limit_s=600)
    app = create_app(settings, set_as_current=False)
    conf = app.conf

    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result  # the retraining chord may add a result backend; scoring never uses it
    assert conf.task_time_limit == 600 and 0 < conf.task_soft_time_limit < 600
    assert {queue.name for queue in conf.task_queues} == {"score", "train", "ingest"}
    assert app.amqp.router.route({}, SCORE_BATCH)["queue"].name == "score"
    assert app.amqp.router.route({}, RECONCILE)["queue"].name == "ingest"
    task = app.tasks[SCORE_BATCH]
    assert task.max_retries is None  # scoring retries for retry_total_s, not a count (worker/tasks.py)
    assert task.acks_late and task.ignore_result
    reconcile = app.tasks[RECONCILE]
    assert reconcile.max_retries == 3 and reconcile.retry_backoff == 3.0 and reconcile.retry_jitter
    assert reconcile.autoretry_for and all(issubclass(cls, Exception) for cls in reconcile.autoretry_for)
    assert app.amqp.router.route({}, REDRIVE_LEASES)["queue"].name == "ingest"
    redis_app = create_app(
        Settings(broker_url="redis://127.0.0.1:6379/15", task_time_limit_s=600), set_as_current=False
    )
    assert redis_app.conf.broker_transport_options["visibility_timeout"] > 600


@pytest.fixture
def embedded(tmp_path: Path, sqlite_url: str, pipeline_model_dir: Path) -> Iterator[tuple[Celery, Settings]]:
    """A fresh SQLite database, a folder bucket with the active model, and a filesystem broker."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    from worker.db import upgrade_database

    upgrade_database(url)
    settings = _settings(tmp_path, url, task_max_attempts=2, retry_backoff_s=0.1, retry_backoff_max_s=1.0)
    store = FolderStore(settings.storage_root)
    store.ensure_bucket()
    engine = make_engine(url)
    publish_model(store, make_session_factory(engine), pipeline_model_dir, model_prefix=settings.model_prefix)
    engine.dispose()
    yield create_app(settings, set_as_current=False), settings


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("threads", 2)])  # threads: the GPU default
def test_real_worker_scores_a_batch_from_the_embedded_broker(
    pool: str, concurrency: int, embedded: tuple[Celery, Settings], dacon_test_images: list[Path]
) -> None:
    """Two copies of a batch in flight at once (the threads pool) still score each image once."""
    app, settings = embedded
    store = FolderStore(settings.storage_root)
    store.put("incoming/ok.png", dacon_test_images[0].read_bytes())
    store.put("incoming/bad.png", b"garbage")
    engine = make_engine(settings.database_url)
    factory: sessionmaker[Session] = make_session_factory(engine)
    from worker import repository

    with session_scope(factory) as session:
        ids = [
            repository.register_image(session, bucket=store.bucket, key=key, etag=None, size=None)[0].id
            for key in ("incoming/ok.png", "incoming/bad.png", "incoming/gone.png")
        ]
    import celery.contrib.testing.tasks  # noqa: F401  (registers celery.ping for start_worker)

    with start_worker(
        app, pool=pool, concurrency=concurrency, perform_ping_check=False, shutdown_timeout=30, loglevel="WARNING"
    ):
        make_enqueue(app)(ids)
        make_enqueue(app)(ids)  # a duplicate task: scored once

        def finished() -> bool:
            with session_scope(factory) as session:
                return set(session.scalars(select(Image.status))) <= {"scored", "failed", "skipped"}

        assert _wait(finished, 60)
        time.sleep(1.0)
        assert queue_depth(app) == 0
    with session_scope(factory) as session:
        statuses = dict(session.execute(select(Image.key, Image.status)).all())
        assert session.scalar(select(Inference.id).where(Inference.image_id == ids[0])) is not None
        assert len(session.scalars(select(Inference.id)).all()) == 1
        # One dead-letter row; two deliveries in flight at once may both count their failed attempt.
        assert session.scalar(select(Failure.attempts)) in {1, concurrency}
    engine.dispose()
    assert statuses == {"incoming/ok.png": "scored", "incoming/bad.png": "failed", "incoming/gone.png": "skipped"}
