"""Leases, the redrive, the retry backoff and the supervisor, on the real databases and real processes."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker import repository
from worker.db import session_scope
from worker.leases import REDRIVES_EXHAUSTED, LeaseHeartbeat, claim, redrive_expired, release
from worker.schema import Failure, Image, utcnow
from worker.settings import Settings
from worker.supervisor import supervise
from worker.tasks import backoff_s


def _images(factory: sessionmaker[Session], count: int) -> list[int]:
    with session_scope(factory) as session:
        return [
            repository.register_image(session, bucket="b", key=f"incoming/lease/{i}.png", etag=f"e{i}", size=1)[0].id
            for i in range(count)
        ]


def _expire(factory: sessionmaker[Session], ids: list[int]) -> None:
    with session_scope(factory) as session:
        session.execute(update(Image).where(Image.id.in_(ids)).values(lease_until=utcnow() - timedelta(seconds=1)))


def test_expired_leases_are_redriven_once_and_give_up_after_max_redrives(
    session_factory: sessionmaker[Session],
) -> None:
    ids = _images(session_factory, 3)
    assert claim(session_factory, ids, owner="w1", lease_s=60) == 3
    sent: list[list[int]] = []
    assert redrive_expired(session_factory, enqueue=sent.append, max_redrives=1).redriven == []  # lease alive

    _expire(session_factory, ids)
    first = redrive_expired(session_factory, enqueue=sent.append, max_redrives=1)
    again = redrive_expired(session_factory, enqueue=sent.append, max_redrives=1)  # a second beat: nothing left
    assert first.redriven == ids and again.redriven == [] and sent == [ids]

    claim(session_factory, ids, owner="w2", lease_s=60)
    _expire(session_factory, ids)
    last = redrive_expired(session_factory, enqueue=sent.append, max_redrives=1)
    assert last.gave_up == ids and last.redriven == [] and len(sent) == 1
    with session_scope(session_factory) as session:
        rows = session.execute(select(Image.status, Image.redrives, Image.lease_until).where(Image.id.in_(ids))).all()
        reasons = set(session.scalars(select(Failure.error_type)))
    assert rows == [("failed", 2, None)] * 3 and reasons == {REDRIVES_EXHAUSTED}


def test_heartbeat_renews_and_release_keeps_only_unfinished_rows_leased(session_factory: sessionmaker[Session]) -> None:
    ids = _images(session_factory, 2)
    claim(session_factory, ids, owner="w1", lease_s=1.5)
    with LeaseHeartbeat(session_factory, ids, owner="w1", lease_s=1.5):
        time.sleep(2.5)  # past the first lease: only renewals keep it
        assert redrive_expired(session_factory, enqueue=lambda _: None, max_redrives=5).redriven == []
    with session_scope(session_factory) as session:
        repository.record_failure(session, image_id=ids[0], error_type="bad_image", message="x")
    assert release(session_factory, ids, owner="w1") == 1
    with session_scope(session_factory) as session:
        leases = dict(session.execute(select(Image.id, Image.claimed_by).where(Image.id.in_(ids))).all())
    assert leases == {ids[0]: None, ids[1]: "w1"}  # the queued one stays leased, for the redrive


def test_backoff_doubles_to_the_cap_and_never_retries_at_once() -> None:
    settings = Settings(retry_backoff_s=2.0, retry_backoff_max_s=60.0)
    for retries, ceiling in ((0, 2.0), (1, 4.0), (4, 32.0), (5, 60.0), (50, 60.0)):
        delays = [backoff_s(settings, retries) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling


def test_supervisor_restarts_after_a_non_zero_exit_and_stops_on_zero(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1 if p.exists() else 1;"
        " p.write_text(str(n)); sys.exit(70 if n < 3 else 0)"
    )
    assert supervise([sys.executable, "-c", script, str(counter)], backoff_s=0.05) == 0
    assert counter.read_text() == "3"
    counter.unlink()
    failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert supervise(failing, backoff_s=0.05, max_restarts=2) == 3
