"""Ingest cost per image: registration (PostgreSQL) and enqueue (Celery on Redis) of SQS-sized pages.

Prints (not a test), for the set-based path (``Ingestor.submit`` → ``register_images``: a constant number
of statements per page) and the per-event path it replaced (``register_image`` once per event inside one
unit of work, as ``submit`` did before), side by side:

* CPU ms per image of the calling thread (``time.thread_time()``: what the ingest process spends,
  excluding PostgreSQL's and Redis's own work) and wall ms per image;
* the ratio per-event / set-based;

once for pages of new objects and once for the same pages delivered again (SQS delivers at least once:
every row is known, still ``queued``, and handed to the batcher again). The goal is ≤ 1 ms of CPU per image.

Needs PostgreSQL (``WAFERWATCH_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432; a throw-away database is
created and dropped) and Redis on 127.0.0.1:6379 (database 13 receives the tasks and is flushed). Usage:
``python bench/bench_ingest.py [--images 2000] [--page 10] [--warmup-pages 20]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import metrics, repository
from worker.app import SCORE_QUEUE, create_app, make_enqueue
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.events import ObjectEvent, unsupported_type_reason
from worker.ingest import Ingestor, make_ingestor, registers_unsupported
from worker.settings import Settings

PG_ADMIN_URL = os.environ.get("WAFERWATCH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_URL = "redis://127.0.0.1:6379/13"
BUCKET = "bench"

Submit = Callable[[Sequence[ObjectEvent]], list[int]]


def submit_per_event(ingestor: Ingestor, events: Sequence[ObjectEvent]) -> list[int]:
    """``Ingestor.submit`` before ``register_images``: 2-3 statements and an ORM load per event (the baseline)."""
    wanted: list[tuple[ObjectEvent, str, str | None]] = []
    for event in events:
        kind = ingestor.prefixes.kind_of(event.key)
        unsupported = unsupported_type_reason(event.key, ingestor._suffixes)
        if event.bucket == ingestor.bucket and not (
            kind is None or (unsupported and not registers_unsupported(event.key, kind))
        ):
            wanted.append((event, kind, unsupported))
    to_score: list[int] = []
    with session_scope(ingestor._session_factory) as session:
        for event, kind, unsupported in wanted:
            image, created = repository.register_image(
                session,
                bucket=event.bucket,
                key=event.key,
                etag=event.etag,
                version_id=event.version_id,
                size=event.size,
                metadata=ingestor._key_metadata(event.key),
                kind=kind,
                skip_reason=unsupported,
            )
            outcome = "unsupported" if unsupported else "new" if created else "known"
            metrics.EVENTS_REGISTERED.labels(kind=kind, outcome=outcome).inc()
            if kind == "incoming" and not unsupported and (created or image.status == "queued"):
                to_score.append(image.id)
    ingestor.batcher.add(to_score)
    return to_score


def synthetic_pages(path: str, n_images: int, page_size: int) -> list[list[ObjectEvent]]:
    """``n_images`` new incoming objects under ``incoming/<tool>/<lot>/<wafer>/``, in pages of ``page_size``."""
    events = [
        ObjectEvent(
            BUCKET,
            f"incoming/T{index % 4}/{path}-L{index // 500}/W{index % 25}/img{index:06d}.png",
            uuid.uuid4().hex,
            None,
            250_000,
            "ObjectCreated:Put",
            None,
        )
        for index in range(n_images)
    ]
    return [events[start : start + page_size] for start in range(0, len(events), page_size)]


def time_pages(submit: Submit, pages: Sequence[Sequence[ObjectEvent]]) -> tuple[float, float]:
    """(CPU ms, wall ms) per image of submitting ``pages`` one after another from this thread."""
    n_images = sum(len(page) for page in pages)
    cpu, wall = time.thread_time(), time.perf_counter()
    for page in pages:
        submit(page)
    return (time.thread_time() - cpu) * 1000 / n_images, (time.perf_counter() - wall) * 1000 / n_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="objects submitted per path and pass")
    parser.add_argument("--page", type=int, default=10, help="events per submit call (an SQS receive: up to 10)")
    parser.add_argument("--warmup-pages", type=int, default=20, help="untimed pages per path first (caches)")
    args = parser.parse_args()
    if args.images < 1 or args.page < 1:
        parser.error("--images and --page must be at least 1")
    logging.basicConfig(level=logging.WARNING)

    db_name = f"waferwatch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=db_name).render_as_string(False)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    engine = None
    try:
        upgrade_database(url)
        settings = Settings(database_url=url, broker_url=BROKER_URL)  # type: ignore[call-arg]
        engine = make_engine(url)
        enqueue = make_enqueue(create_app(settings))
        ingestor = make_ingestor(settings, session_factory=make_session_factory(engine), enqueue=enqueue, bucket=BUCKET)
        paths: dict[str, Submit] = {
            "per-event": lambda page: submit_per_event(ingestor, page),
            "set-based": ingestor.submit,
        }
        try:
            figures: dict[tuple[str, str], tuple[float, float]] = {}
            for name, submit in paths.items():
                time_pages(submit, synthetic_pages(f"warmup-{name}", args.warmup_pages * args.page, args.page))
            for name, submit in paths.items():
                pages = synthetic_pages(name, args.images, args.page)
                figures[name, "new"] = time_pages(submit, pages)
                figures[name, "redelivered"] = time_pages(submit, pages)
        finally:
            ingestor.close()
        tasks = broker.llen(SCORE_QUEUE)
        print(f"{args.images} images per path and pass, pages of {args.page}, PostgreSQL + Celery on Redis db 13")
        print(f"{'pass':<12} {'path':<10} {'CPU ms/image':>13} {'wall ms/image':>14}")
        for pass_name in ("new", "redelivered"):
            for name in paths:
                cpu_ms, wall_ms = figures[name, pass_name]
                print(f"{pass_name:<12} {name:<10} {cpu_ms:>13.3f} {wall_ms:>14.3f}")
            old, new = figures["per-event", pass_name], figures["set-based", pass_name]
            print(f"{pass_name:<12} {'ratio':<10} {old[0] / new[0]:>12.2f}× {old[1] / new[1]:>13.2f}×")
        print(f"score_batch tasks sent: {tasks}")
    finally:
        if engine is not None:
            engine.dispose()
        broker.flushdb()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
