"""Reconciliation: make the database agree with the bucket, so a lost notification delays but never loses.

:func:`reconcile` lists the ``incoming/`` and ``nominal/`` prefixes, registers every image object whose
*version* has no ``images`` row (its key and ETag: an overwrite whose notification was lost is found
although its key has rows; a HEAD gives its version id on a versioned bucket) and enqueues the new
incoming ones; an incoming object that is not a supported image gets a ``skipped`` row with the
reason. Then it re-enqueues incoming images that have been ``queued`` for longer than ``stale_after_s``
(an enqueue lost between the ingest commit and the broker, or a message dropped by a broker restart).
A re-enqueued image's ``status_changed_at`` is bumped in the same conditional UPDATE, so the next run
waits another ``stale_after_s`` before sending it again, and a long but healthy queue is not flooded
with duplicates.

Run it from ``waferwatch reconcile`` or the ``waferwatch.reconcile`` task (which the beat schedule of the
retraining issue calls periodically). Safe to run concurrently with ingest and with itself: registration
is idempotent and the worker scores an image once per model version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker import repository
from worker.db import session_scope
from worker.errors import ObjectMissingError
from worker.events import DEFAULT_IMAGE_SUFFIXES, unsupported_type_reason
from worker.ingest import Enqueue, Prefixes, registers_unsupported
from worker.schema import Image, utcnow
from worker.storage import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["ReconcileReport", "reconcile"]

logger = logging.getLogger(__name__)

_REGISTER_CHUNK = 500


@dataclass
class ReconcileReport:
    """What one reconciliation pass found and did."""

    listed: dict[str, int] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)
    requeued_stale: int = 0
    enqueued_images: int = 0
    tasks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    enqueue: Enqueue,
    key_metadata: Callable[[str], Mapping[str, str]],
    prefixes: Prefixes | None = None,
    stale_after_s: float = 900.0,
    batch_size: int = 32,
    suffixes: Sequence[str] = DEFAULT_IMAGE_SUFFIXES,
) -> ReconcileReport:
    """One pass: register unknown objects, enqueue them and stale ``queued`` images (see the module docstring)."""
    prefixes = prefixes or Prefixes()
    report = ReconcileReport()
    lowered = tuple(suffix.lower() for suffix in suffixes)
    to_score: list[int] = []
    for kind, prefix in (("incoming", prefixes.incoming), ("nominal", prefixes.nominal)):
        listing = [
            info
            for info in store.list(prefix)
            if info.key.lower().endswith(lowered) or registers_unsupported(info.key, kind)
        ]
        report.listed[kind] = len(listing)
        with session_scope(session_factory) as session:
            missing = repository.versions_without_rows(session, bucket=store.bucket, objects=listing)
        registered = 0
        for start in range(0, len(missing), _REGISTER_CHUNK):
            versions = [_current_version(store, info) for info in missing[start : start + _REGISTER_CHUNK]]
            with session_scope(session_factory) as session:
                for info in versions:
                    if info is None:
                        continue
                    unsupported = unsupported_type_reason(info.key, lowered)
                    image, created = repository.register_image(
                        session,
                        bucket=store.bucket,
                        key=info.key,
                        etag=info.etag,
                        version_id=info.version_id,
                        size=info.size,
                        metadata=key_metadata(info.key),
                        kind=kind,
                        skip_reason=unsupported,
                    )
                    registered += int(created)
                    if kind == "incoming" and not unsupported and (created or image.status == "queued"):
                        to_score.append(image.id)
        report.registered[kind] = registered
        if registered:
            logger.warning("reconcile: %d %s objects had no row (lost notifications)", registered, kind)
    stale = _claim_stale(session_factory, bucket=store.bucket, older_than_s=stale_after_s, exclude=set(to_score))
    report.requeued_stale = len(stale)
    to_score.extend(stale)
    for start in range(0, len(to_score), batch_size):
        enqueue(to_score[start : start + batch_size])
        report.tasks += 1
    report.enqueued_images = len(to_score)
    return report


def _current_version(store: ObjectStore, listed: ObjectInfo) -> ObjectInfo | None:
    """The listed object with its version id (a listing has none; a HEAD on a versioned bucket does), so
    the row matches the one ingest registers from the notification; None if it was deleted meanwhile. A
    HEAD that shows a newer ETag than the listing is fine: that newer version is the one to register."""
    try:
        return store.head(listed.key)
    except ObjectMissingError:
        return None


def _claim_stale(
    session_factory: sessionmaker[Session], *, bucket: str, older_than_s: float, exclude: set[int]
) -> list[int]:
    """Ids of incoming images ``queued`` for longer than ``older_than_s``, with their clock restarted."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with session_scope(session_factory) as session:
        ids = [
            image_id
            for image_id in session.scalars(
                select(Image.id)
                .where(
                    Image.bucket == bucket,
                    Image.kind == "incoming",
                    Image.status == "queued",
                    Image.status_changed_at < cutoff,
                )
                .order_by(Image.id)
            )
            if image_id not in exclude
        ]
        claimed: list[int] = []
        for start in range(0, len(ids), _REGISTER_CHUNK):
            chunk = ids[start : start + _REGISTER_CHUNK]
            # Conditional: an image scored meanwhile (or claimed by a concurrent pass) is left alone.
            rows = session.execute(
                update(Image)
                .where(Image.id.in_(chunk), Image.status == "queued", Image.status_changed_at < cutoff)
                .values(status_changed_at=utcnow())
                .returning(Image.id)
            ).scalars()
            claimed.extend(rows)
    return sorted(claimed)


def reconcile_with_settings(
    settings: Settings, *, session_factory: sessionmaker[Session], store: ObjectStore, enqueue: Enqueue
) -> ReconcileReport:
    """:func:`reconcile` with the prefixes, key metadata, staleness and batch size of ``settings`` (what the
    ``waferwatch reconcile`` command and the periodic task both run)."""
    return reconcile(
        session_factory=session_factory,
        store=store,
        enqueue=enqueue,
        key_metadata=settings.key_metadata,
        prefixes=Prefixes(settings.incoming_prefix, settings.nominal_prefix),
        stale_after_s=settings.reconcile_stale_after_s,
        batch_size=settings.batch_size,
    )
