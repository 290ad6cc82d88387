"""Registration cost of one event page on real PostgreSQL and SQLite: a constant number of statements.

Ingest CPU is dominated by database round trips and ORM loading, so the budget (about 1 ms of CPU per
image, ``bench/bench_ingest.py``) holds only while a page costs the same few statements whatever its
size. The counts come from the engine's ``before_cursor_execute`` event, i.e. what reaches the driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from worker.db import session_scope
from worker.events import ObjectEvent
from worker.ingest import Ingestor
from worker.repository import ObjectVersion, register_images
from worker.schema import Image

BUCKET = "fab"
MAX_STATEMENTS_PER_PAGE = 3  # INSERT ... RETURNING, SELECT of known rows, UPDATE of rows learning an ETag


@contextmanager
def counting_statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL of every statement sent to the driver while the block runs (BEGIN/COMMIT excluded)."""
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.split(None, 1)[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK"}:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _events(prefix: str, n_events: int) -> list[ObjectEvent]:
    return [
        ObjectEvent(BUCKET, f"incoming/{prefix}/{index}.png", f"e{index}", None, 10, "ObjectCreated:Put", None)
        for index in range(n_events)
    ]


def _ingestor(session_factory: sessionmaker[Session], sent: list[list[int]]) -> Ingestor:
    return Ingestor(
        session_factory=session_factory, enqueue=lambda ids: sent.append(list(ids)), bucket=BUCKET,
        key_metadata=lambda key: {"lot": key.split("/")[1]}, batch_size=1000, batch_wait_ms=60_000,
    )  # fmt: skip


def _statements_of_submit(engine: Engine, ingestor: Ingestor, events: list[ObjectEvent]) -> int:
    with counting_statements(engine) as statements:
        ingestor.submit(events)
    return len(statements)


def test_a_page_costs_the_same_few_statements_whatever_its_size(
    db_engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    """Fails on the per-event path (2-3 statements per image: 20+ for 10 events, 80+ for 40)."""
    sent: list[list[int]] = []
    ingestor = _ingestor(session_factory, sent)
    try:
        new_10 = _statements_of_submit(db_engine, ingestor, _events("small", 10))
        new_40 = _statements_of_submit(db_engine, ingestor, _events("large", 40))
        known_10 = _statements_of_submit(db_engine, ingestor, _events("small", 10))
        known_40 = _statements_of_submit(db_engine, ingestor, _events("large", 40))
        redelivered = _statements_of_submit(db_engine, ingestor, [*_events("small", 5), *_events("again", 5) * 2])
    finally:
        ingestor.close()
    assert new_10 == new_40 <= MAX_STATEMENTS_PER_PAGE
    assert known_10 == known_40 <= MAX_STATEMENTS_PER_PAGE
    assert redelivered <= MAX_STATEMENTS_PER_PAGE
    with session_scope(session_factory) as session:
        assert len(session.scalars(select(Image.id)).all()) == 55
        lots = set(session.scalars(select(Image.lot)))
    assert lots == {"small", "large", "again"}
    ids = [image_id for batch in sent for image_id in batch]
    assert len(ids) == 10 + 40 + 10 + 40 + 15  # queued rows are handed to the batcher again, as before


def test_register_images_statement_count_is_independent_of_page_size(
    db_engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    """Including the rare UPDATE: rows registered before migration 0003 learn their ETag in one statement."""

    def page(prefix: str, n_objects: int) -> list[ObjectVersion]:
        return [ObjectVersion(BUCKET, f"incoming/{prefix}/{index}.png", f"e{index}", 10) for index in range(n_objects)]

    with session_scope(session_factory) as session:
        for prefix, n_objects in (("small", 10), ("large", 40)):
            legacy = [{"bucket": BUCKET, "key": f"incoming/{prefix}/{i}.png", "etag_or_version": f"e{i}", "meta": {}}
                      for i in range(0, n_objects, 2)]  # fmt: skip
            session.add_all(Image(**row) for row in legacy)
    counts = []
    for prefix, n_objects in (("small", 10), ("large", 40)):
        with counting_statements(db_engine) as statements, session_scope(session_factory) as session:
            results = register_images(session, page(prefix, n_objects))
        counts.append(len(statements))
        assert [result.created for result in results] == [index % 2 == 1 for index in range(n_objects)]
    assert counts[0] == counts[1] == MAX_STATEMENTS_PER_PAGE
    with session_scope(session_factory) as session:
        assert session.scalars(select(Image.id).where(Image.etag.is_(None))).all() == []
