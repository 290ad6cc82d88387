"""Leases on images rows: a dead or hung worker's images are re-driven in seconds, not after hours.

A ``score_batch`` task claims the rows of its batch (``claimed_by`` = host:pid, ``lease_until`` = now +
``lease_s``) before it scores them, and a :class:`LeaseHeartbeat` thread renews the lease every third of
``lease_s`` while the batch runs. A finished batch releases its rows. If the worker is killed (``kill -9``,
OOM, a watchdog exit) the lease is simply not renewed: :func:`redrive_expired`, run by the beat task
``waferwatch.redrive_leases`` every ``redrive_interval_s``, finds rows still ``queued`` whose lease
expired and sends them again, so they are re-driven within ``lease_s + redrive_interval_s`` (80 s by
default) instead of after Redis's visibility timeout (2 h). Each redrive is counted in ``redrives``; a row
re-driven ``max_redrives`` times (a poison batch that kills every worker) gets a failures row instead.

Redelivery stays harmless: the message of the dead worker may still come back after the visibility
timeout, and a lease can expire under a live worker (a database blip stopped the heartbeat); scoring
skips rows that already have an inference of the version and ``inferences`` is unique per image and
version, so a second delivery never writes a second inference. Every state change here is a
conditional UPDATE, so two beats (or a beat and a worker) racing on a row do no harm.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker import repository
from worker.db import session_scope
from worker.schema import Image, utcnow

__all__ = [
    "REDRIVES_EXHAUSTED",
    "LeaseHeartbeat",
    "RedriveReport",
    "claim",
    "extend",
    "lease_owner",
    "redrive_expired",
    "release",
]

logger = logging.getLogger(__name__)

#: The error type of the failures row written when an image used up its redrives.
REDRIVES_EXHAUSTED = "RedrivesExhausted"


def lease_owner() -> str:
    """``host:pid`` of this process: who holds a lease (for operators; correctness never depends on it)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(session_factory: sessionmaker[Session], image_ids: Sequence[int], *, owner: str, lease_s: float) -> int:
    """Lease the ``queued`` rows of ``image_ids`` to ``owner`` for ``lease_s``; returns how many rows.

    A row leased by another live worker is taken over: the newest delivery holds it (both would write
    the same inference once; the lease only decides who is re-driven when nobody renews it).
    """
    if not image_ids:
        return 0
    with session_scope(session_factory) as session:
        result = session.execute(
            update(Image)
            .where(Image.id.in_(list(image_ids)), Image.status == "queued")
            .values(claimed_by=owner, lease_until=utcnow() + timedelta(seconds=lease_s))
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def extend(session_factory: sessionmaker[Session], image_ids: Sequence[int], *, owner: str, lease_s: float) -> int:
    """Renew ``owner``'s lease on the still ``queued`` rows of ``image_ids``; returns how many rows."""
    if not image_ids:
        return 0
    with session_scope(session_factory) as session:
        result = session.execute(
            update(Image)
            .where(Image.id.in_(list(image_ids)), Image.claimed_by == owner, Image.status == "queued")
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release(session_factory: sessionmaker[Session], image_ids: Sequence[int], *, owner: str) -> int:
    """Drop ``owner``'s lease on the rows of ``image_ids`` that reached a terminal state.

    A row still ``queued`` keeps its lease: the batch raised (it is retried) and, if the retry never
    comes (the worker died while it waited), the expired lease re-drives it.
    """
    if not image_ids:
        return 0
    with session_scope(session_factory) as session:
        result = session.execute(
            update(Image)
            .where(Image.id.in_(list(image_ids)), Image.claimed_by == owner, Image.status != "queued")
            .values(claimed_by=None, lease_until=None)
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


class LeaseHeartbeat:
    """A daemon thread that renews a batch's lease every ``lease_s / 3`` while the ``with`` block runs.

    A failed renewal (database down) is logged and tried again at the next beat: the lease may then
    expire and the rows be re-driven, which costs a duplicate delivery, never a duplicate inference.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], image_ids: Sequence[int], *, owner: str, lease_s: float
    ) -> None:
        self._session_factory = session_factory
        self._image_ids = list(image_ids)
        self._owner = owner
        self._lease_s = lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            try:
                extend(self._session_factory, self._image_ids, owner=self._owner, lease_s=self._lease_s)
            except Exception:  # the next beat tries again; an expired lease only re-drives
                logger.warning("could not renew the lease of %d images", len(self._image_ids), exc_info=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class RedriveReport:
    """What one redrive pass did: rows sent again, and rows that used up their redrives."""

    redriven: list[int] = field(default_factory=list)
    gave_up: list[int] = field(default_factory=list)


def redrive_expired(
    session_factory: sessionmaker[Session],
    *,
    enqueue: Callable[[Sequence[int]], None],
    max_redrives: int,
    batch_size: int = 32,
    now: datetime | None = None,
) -> RedriveReport:
    """Re-enqueue the ``queued`` rows whose lease expired; dead-letter those re-driven ``max_redrives`` times.

    Each row is taken by a conditional UPDATE (still ``queued``, lease still the expired one), which also
    clears the lease and counts the redrive, and is committed before it is sent: a lost send leaves an
    unleased ``queued`` row for reconciliation, and a beat racing this one finds nothing left to take.
    """
    now = now or utcnow()
    report = RedriveReport()
    with session_scope(session_factory) as session:
        expired = session.execute(
            select(Image.id, Image.redrives, Image.lease_until)
            .where(Image.status == "queued", Image.lease_until.is_not(None), Image.lease_until < now)
            .order_by(Image.id)
        ).all()
        for row in expired:
            taken = session.execute(
                update(Image)
                .where(
                    Image.id == row.id,
                    Image.status == "queued",
                    Image.lease_until == row.lease_until,
                    Image.redrives == row.redrives,
                )
                .values(claimed_by=None, lease_until=None, redrives=Image.redrives + 1)
            )
            if not taken.rowcount:  # type: ignore[attr-defined]
                continue
            if row.redrives >= max_redrives:
                repository.record_failure(
                    session,
                    image_id=row.id,
                    error_type=REDRIVES_EXHAUSTED,
                    message=(
                        f"its worker died or hung {row.redrives + 1} times while scoring it (lease expired; "
                        f"max_redrives={max_redrives}); the worker logs say why"
                    ),
                )
                report.gave_up.append(row.id)
            else:
                report.redriven.append(row.id)
    for begin in range(0, len(report.redriven), batch_size):
        enqueue(report.redriven[begin : begin + batch_size])
    if report.redriven or report.gave_up:
        logger.warning(
            "lease redrive: %d images re-enqueued, %d gave up (max_redrives=%d)",
            len(report.redriven),
            len(report.gave_up),
            max_redrives,
        )
    return report
