"""Consume MinIO's Redis notification target in ``access`` format (a list of JSON arrays).

MinIO ``RPUSH``-es one element per event onto the configured key, each element
being ``[{"Event": [<record>], "EventTime": "..."}]``.  A plain ``BLPOP`` would
lose the element if the worker died between pop and submit, so the reliable-queue
pattern is used instead: ``BLMOVE`` atomically moves the element into a
processing list, and ``LREM`` removes it from there only after ``submit``
returned.  Elements left in the processing list (crash, failed submit) are put
back at the head of the main list by ``recover()``, which ``run()`` calls at start
and after every failure.

Several consumers on one list must each use their own ``processing_key``, or one
consumer's ``recover()`` re-queues another's in-flight elements (duplicates only).
``BLMOVE`` needs Redis >= 6.2, and the client's ``socket_timeout`` must exceed the
poll timeout.
"""

from __future__ import annotations

import logging
import threading

import redis

from worker.errors import BadEventError, EventSubmitError, QueueUnavailableError
from worker.events import excerpt, parse_notification
from worker.sources import Submit, run_until_stopped

logger = logging.getLogger(__name__)


class RedisListSource:
    """Reliable consumer of one Redis list written by MinIO's ``access``-format Redis target."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        submit: Submit,
        processing_key: str | None = None,
        poll_timeout_s: float = 5.0,
    ) -> None:
        self._client = client
        self.key = key
        self.processing_key = processing_key or f"{key}:processing"
        self._submit = submit
        self.poll_timeout_s = poll_timeout_s

    def poll_once(self, timeout_s: float | None = None) -> int:
        """Move one element into the processing list, submit its events, then remove it.

        Returns the number of events submitted (0 when the list stayed empty for
        ``timeout_s``).  If ``submit`` raises, the element stays in the processing
        list and ``EventSubmitError`` is raised.
        """
        wait_s = self.poll_timeout_s if timeout_s is None else timeout_s
        try:
            raw = self._client.blmove(self.key, self.processing_key, wait_s, src="LEFT", dest="RIGHT")
        except redis.RedisError as exc:
            raise QueueUnavailableError(
                f"cannot read Redis list {self.key!r} ({exc}); check the Redis URL and that Redis is up"
            ) from exc
        if raw is None:
            return 0
        try:
            events = parse_notification(raw)
        except BadEventError as exc:
            logger.error(
                "Redis list %r: element is not a bucket notification (%s); dropping it. Body: %r",
                self.key,
                exc,
                excerpt(raw),
            )
            self._acknowledge(raw)
            return 0
        if events:
            try:
                self._submit(events)
            except Exception as exc:
                raise EventSubmitError(
                    f"submit failed for an element of Redis list {self.key!r} ({type(exc).__name__}: {exc}); "
                    f"it stays in {self.processing_key!r} until recover() re-queues it"
                ) from exc
        self._acknowledge(raw)
        return len(events)

    def recover(self) -> int:
        """Move every element of the processing list back to the head of the main list.

        Returns how many elements were re-queued.  Order is preserved: the oldest
        in-flight element is consumed first again.
        """
        moved = 0
        try:
            while self._client.lmove(self.processing_key, self.key, src="RIGHT", dest="LEFT") is not None:
                moved += 1
        except redis.RedisError as exc:
            raise QueueUnavailableError(
                f"cannot re-queue {self.processing_key!r} into {self.key!r} ({exc}); retry when Redis is up"
            ) from exc
        if moved:
            logger.warning("re-queued %d unacknowledged elements from %r", moved, self.processing_key)
        return moved

    def run(self, stop_event: threading.Event) -> None:
        """Recover leftovers, then poll until ``stop_event`` is set (recovering after failures)."""
        needs_recovery = True

        def poll() -> int:
            nonlocal needs_recovery
            if needs_recovery:
                self.recover()
                needs_recovery = False
            try:
                return self.poll_once()
            except EventSubmitError:
                needs_recovery = True
                raise

        run_until_stopped(poll, stop_event, name=f"redis list {self.key}")

    def _acknowledge(self, raw: bytes | str) -> None:
        try:
            self._client.lrem(self.processing_key, 1, raw)
        except redis.RedisError as exc:
            raise QueueUnavailableError(
                f"submitted an element but could not remove it from {self.processing_key!r} ({exc}); "
                "it will be submitted again after recovery (harmless duplicate)"
            ) from exc
