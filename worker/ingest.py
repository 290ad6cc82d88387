"""The submit callback of every event source: register images, then enqueue micro-batches.

:class:`Ingestor` is what ``SqsSource``, the webhook, ``RedisListSource`` and ``FolderWatcher`` call with
parsed events. For each call it

1. keeps events of the configured bucket under the ``incoming/`` (scored) or ``nominal/`` (training
   pool, registered but not scored) prefix and with an image suffix; an incoming object of another type
   is registered as ``skipped`` with the reason (:func:`worker.events.unsupported_type_reason`), so it is
   accounted for; hidden and half-written names (``.tmp``, ``.part``) and folder markers are ignored;
2. registers them in **one committed transaction** with a constant number of statements per page
   (:func:`worker.repository.register_images`, idempotent like ``register_image``), so when
   :meth:`Ingestor.submit` returns, the database row is the durable record of the object and the
   source may acknowledge upstream;
3. adds the ids of incoming images that still wait for a score (new rows, or rows still ``queued``
   because a previous enqueue was lost) to the batcher.

The batcher sends one ``score_batch`` task per ``batch_size`` ids, or sooner when its oldest id has
waited ``batch_wait_ms`` (a background thread flushes by age). An enqueue lost to a crash between the
commit and the send leaves the image ``queued``; reconciliation re-enqueues such images after
``reconcile_stale_after_s``. Duplicates (a repeated event, reconciliation racing a notification) may
send an image twice; the worker scores it once.

:func:`build_source` wires a source from settings and :func:`run_ingest` runs it until stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from worker import metrics, repository
from worker.db import session_scope
from worker.events import DEFAULT_IMAGE_SUFFIXES, ObjectEvent, unsupported_type_reason
from worker.settings import Settings
from worker.storage import is_ignored_name

__all__ = [
    "SOURCES",
    "Enqueue",
    "Ingestor",
    "MicroBatcher",
    "Source",
    "build_source",
    "run_ingest",
]

logger = logging.getLogger(__name__)

Enqueue = Callable[[Sequence[int]], None]
"""Sends one ``score_batch`` task for the given image ids."""

SourceName = Literal["sqs", "webhook", "redis", "folder"]
SOURCES: tuple[str, ...] = ("sqs", "webhook", "redis", "folder")


class Source(Protocol):
    """What :func:`run_ingest` needs from an event source."""

    def run(self, stop_event: threading.Event) -> None: ...


class MicroBatcher:
    """Groups image ids into batches by count (``batch_size``) or age (``batch_wait_ms``), or sends a
    partial batch at once when the workers have nothing waiting (``idle``).

    Thread-safe: sources may call :meth:`add` from several threads (the webhook does). A full batch is
    sent in the caller's thread; partial batches are sent by a daemon thread once the oldest id is
    ``batch_wait_ms`` old. :meth:`close` sends what is left.

    ``idle`` (optional, :func:`worker.app.workers_idle`) answers "are the workers idle?". When they are,
    waiting for more images only delays this one: the partial batch goes now. While they are busy, new
    images accumulate by count and age as before, so under load batches still fill up. At one image
    every 2 s this cut upload → committed row from 0.59 s to 0.09 s (p50; ``bench/bench_pipeline.py``),
    since most of the 0.59 s was the ``batch_wait_ms`` wait.
    """

    def __init__(
        self,
        enqueue: Enqueue,
        *,
        batch_size: int,
        batch_wait_ms: int,
        idle: Callable[[], bool] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._enqueue = enqueue
        self._idle = idle
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._pending: list[int] = []
        self._oldest: float | None = None
        self._condition = threading.Condition()
        self._closed = False
        self._timer = threading.Thread(target=self._flush_by_age, name="batcher", daemon=True)
        self._timer.start()

    def add(self, image_ids: Sequence[int]) -> None:
        """Queue ids; full batches are enqueued before this returns."""
        full: list[list[int]] = []
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            for image_id in image_ids:
                if not self._pending:
                    self._oldest = time.monotonic()
                self._pending.append(image_id)
                if len(self._pending) >= self.batch_size:
                    full.append(self._take())
            self._condition.notify_all()
        for batch in full:
            self._send(batch)
        if self._idle is not None and self.pending and self._idle():
            self.flush()

    def flush(self) -> None:
        """Enqueue the partial batch now."""
        with self._condition:
            batch = self._take()
        self._send(batch)

    def close(self) -> None:
        """Flush and stop the age thread."""
        with self._condition:
            self._closed = True
            batch = self._take()
            self._condition.notify_all()
        self._send(batch)
        self._timer.join(timeout=5)

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._pending)

    def _take(self) -> list[int]:
        batch, self._pending, self._oldest = self._pending, [], None
        return batch

    def _send(self, batch: list[int]) -> None:
        if batch:
            self._enqueue(batch)

    def _flush_by_age(self) -> None:
        while True:
            with self._condition:
                while not self._closed and self._oldest is None:
                    self._condition.wait()
                if self._closed:
                    return
                assert self._oldest is not None
                remaining = self._oldest + self.batch_wait_s - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                batch = self._take()
            try:
                self._send(batch)
            except Exception:  # the rows are committed and stay queued; reconciliation re-sends them
                logger.exception("could not enqueue a batch of %d images; reconciliation will re-send it", len(batch))


@dataclass(frozen=True, slots=True)
class Prefixes:
    """Which key prefix means which image kind."""

    incoming: str = "incoming/"
    nominal: str = "nominal/"

    def kind_of(self, key: str) -> str | None:
        if key.startswith(self.incoming):
            return "incoming"
        if key.startswith(self.nominal):
            return "nominal"
        return None


class Ingestor:
    """The ``submit(events)`` callback of the event sources (see the module docstring)."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        enqueue: Enqueue,
        bucket: str,
        key_metadata: Callable[[str], Mapping[str, str]],
        prefixes: Prefixes | None = None,
        batch_size: int = 32,
        batch_wait_ms: int = 500,
        suffixes: Sequence[str] = DEFAULT_IMAGE_SUFFIXES,
        idle: Callable[[], bool] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self.bucket = bucket
        self._key_metadata = key_metadata
        self.prefixes = prefixes or Prefixes()
        self._suffixes = tuple(suffix.lower() for suffix in suffixes)
        self.batcher = MicroBatcher(enqueue, batch_size=batch_size, batch_wait_ms=batch_wait_ms, idle=idle)

    def __call__(self, events: list[ObjectEvent]) -> None:
        self.submit(events)

    def submit(self, events: Sequence[ObjectEvent]) -> list[int]:
        """Register ``events`` (committed) and batch the incoming ones; returns the ids handed to the batcher."""
        wanted: list[tuple[ObjectEvent, str, str | None]] = []
        for event in events:
            kind = self.prefixes.kind_of(event.key)
            unsupported = unsupported_type_reason(event.key, self._suffixes)
            if event.bucket != self.bucket:
                logger.warning(
                    "ignoring %s/%s: ingest is configured for bucket %s", event.bucket, event.key, self.bucket
                )
            elif kind is None or (unsupported and not registers_unsupported(event.key, kind)):
                logger.debug("ignoring %s: not an image under an incoming or nominal prefix", event.key)
            else:
                wanted.append((event, kind, unsupported))
        if not wanted:
            return []
        objects = [
            repository.ObjectVersion(
                bucket=event.bucket,
                key=event.key,
                etag=event.etag,
                version_id=event.version_id,
                size=event.size,
                metadata=self._key_metadata(event.key),
                kind=kind,
                skip_reason=unsupported,
            )
            for event, kind, unsupported in wanted
        ]
        with session_scope(self._session_factory) as session:
            registrations = repository.register_images(session, objects)
        to_score: list[int] = []
        outcomes: Counter[tuple[str, str]] = Counter()
        for (_, kind, unsupported), registration in zip(wanted, registrations, strict=True):
            outcomes[kind, "unsupported" if unsupported else "new" if registration.created else "known"] += 1
            if kind == "incoming" and not unsupported and (registration.created or registration.status == "queued"):
                to_score.append(registration.image_id)
        for (kind, outcome), count in outcomes.items():
            metrics.EVENTS_REGISTERED.labels(kind=kind, outcome=outcome).inc(count)
        self.batcher.add(to_score)
        return to_score

    def close(self) -> None:
        """Enqueue what is still batched (call before the process exits)."""
        self.batcher.close()


def registers_unsupported(key: str, kind: str) -> bool:
    """Whether an object that is not an image still gets a (``skipped``) row: incoming objects do, except
    folder markers (``incoming/x/``) and hidden or half-written names an uploader is still writing."""
    return kind == "incoming" and not key.endswith("/") and not is_ignored_name(key.rsplit("/", 1)[-1])


def make_ingestor(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    enqueue: Enqueue,
    bucket: str,
    idle: Callable[[], bool] | None = None,
) -> Ingestor:
    """An :class:`Ingestor` with the prefixes, batching and key metadata of ``settings``; ``idle`` (see
    :class:`MicroBatcher`, e.g. :func:`worker.app.workers_idle`) is used when ``flush_when_idle`` is on."""
    return Ingestor(
        session_factory=session_factory,
        enqueue=enqueue,
        bucket=bucket,
        key_metadata=settings.key_metadata,
        prefixes=Prefixes(settings.incoming_prefix, settings.nominal_prefix),
        batch_size=settings.batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        idle=idle if settings.flush_when_idle else None,
    )


class _FolderSources:
    """One polling loop over the incoming and nominal folders of the folder storage."""

    def __init__(self, watchers: Sequence[Any], poll_interval_s: float) -> None:
        self._watchers = list(watchers)
        self._poll_interval_s = poll_interval_s

    def run(self, stop_event: threading.Event) -> None:
        from worker.sources import run_until_stopped

        def poll() -> int:
            handled = sum(watcher.poll_once() for watcher in self._watchers)
            stop_event.wait(self._poll_interval_s)
            return handled

        run_until_stopped(poll, stop_event, name="folder storage")


def build_source(
    name: str,
    settings: Settings,
    submit: Callable[[list[ObjectEvent]], None],
    *,
    bucket: str,
    stable_after_s: float | None = None,
    sqs_wait_time_s: int = 10,
) -> Source:
    """The event source ``name`` (one of :data:`SOURCES`) configured from ``settings``, calling ``submit``.

    Raises:
        ValueError: a setting the source needs is missing (the message names it).
    """
    if name == "sqs":
        import boto3

        from worker.sources.sqs import SqsSource

        if not settings.sqs_queue_url:
            raise ValueError("--source sqs needs WAFERWATCH_SQS_QUEUE_URL")
        client = boto3.client(
            "sqs",
            endpoint_url=settings.sqs_endpoint_url or settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
            aws_secret_access_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        )
        return SqsSource(settings.sqs_queue_url, client=client, submit=submit, wait_time_s=sqs_wait_time_s)
    if name == "webhook":
        from worker.sources.webhook import serve

        if settings.webhook_token is None or not settings.webhook_token.get_secret_value():
            raise ValueError("--source webhook needs WAFERWATCH_WEBHOOK_TOKEN (the bearer token MinIO sends)")
        token = settings.webhook_token.get_secret_value()

        class _Webhook:
            def run(self, stop_event: threading.Event) -> None:
                serve(settings.webhook_host, settings.webhook_port, token, submit, stop_event=stop_event)

        return _Webhook()
    if name == "redis":
        import redis

        from worker.sources.redis_list import RedisListSource

        url = settings.redis_events_url or (settings.broker_url if settings.broker_url.startswith("redis") else None)
        if url is None:
            raise ValueError("--source redis needs WAFERWATCH_REDIS_EVENTS_URL (MinIO's Redis target)")
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
        return RedisListSource(client, settings.redis_events_key, submit=submit)
    if name == "folder":
        from worker.sources.folder import FolderWatcher

        if settings.storage != "folder":
            raise ValueError("--source folder watches the folder storage; set WAFERWATCH_STORAGE=folder")
        root = Path(settings.storage_root)
        watchers = [
            FolderWatcher(
                root,
                submit=submit,
                prefix=prefix,
                bucket_name=bucket,
                stable_after_s=settings.watch_poll_s if stable_after_s is None else stable_after_s,
                poll_interval_s=settings.watch_poll_s,
            )
            for prefix in (settings.incoming_prefix, settings.nominal_prefix)
        ]
        for prefix in (settings.incoming_prefix, settings.nominal_prefix):
            (root / prefix).mkdir(parents=True, exist_ok=True)
        return _FolderSources(watchers, settings.watch_poll_s)
    raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")


def run_ingest(
    source: Source,
    ingestor: Ingestor,
    stop_event: threading.Event,
    *,
    on_idle: Callable[[], None] | None = None,
    idle_every_s: float = 5.0,
) -> None:
    """Run ``source`` until ``stop_event`` is set, then enqueue what is still batched.

    ``on_idle`` (e.g. refreshing the queue-depth gauge) is called every ``idle_every_s`` from a helper
    thread while the source runs.
    """
    helper: threading.Thread | None = None
    if on_idle is not None:

        def tick() -> None:
            while not stop_event.wait(idle_every_s):
                on_idle()

        helper = threading.Thread(target=tick, name="ingest-idle", daemon=True)
        helper.start()
    try:
        source.run(stop_event)
    finally:
        stop_event.set()
        ingestor.close()
        if helper is not None:
            helper.join(timeout=idle_every_s + 1)
