"""Domain exceptions for the worker side of waferwatch.

Every failure a task or an event source can meet is one of two kinds, and the
kind decides what happens to the work item:

* ``PermanentError`` -- retrying cannot help (the object is empty, too big, was
  deleted, the notification is not JSON).  The caller records the outcome and
  acknowledges the message so it is not redelivered forever.
* ``TransientError`` -- the world is temporarily broken (storage, queue or
  database unreachable, the submit callback failed).  The caller keeps the
  message and retries with backoff.

Callers decide with ``isinstance(exc, PermanentError)``; they never parse
messages.  Raise these with ``raise X(...) from exc`` so the low-level cause
stays in the traceback.
"""

from __future__ import annotations


class WaferwatchError(Exception):
    """Base of every waferwatch domain error."""


class PermanentError(WaferwatchError):
    """Retrying the same work item will fail the same way: record it and acknowledge."""


class TransientError(WaferwatchError):
    """A dependency is temporarily unavailable: keep the work item and retry later."""


class BadObjectError(PermanentError):
    """The stored object cannot be scored: empty, larger than the limit, or not addressable."""


class ObjectMissingError(PermanentError):
    """The object named by an event no longer exists (deleted before we fetched it)."""


class BadEventError(PermanentError):
    """A notification body is not valid JSON or not a known S3 event shape."""


class StorageUnavailableError(TransientError):
    """Object storage could not be reached or answered with a server-side error."""


class DatabaseUnavailableError(TransientError):
    """The results database could not be reached or refused the connection."""


class QueueUnavailableError(TransientError):
    """The notification queue (SQS, Redis) could not be reached."""


class EventSubmitError(TransientError):
    """The submit callback raised; the upstream message was kept for redelivery."""


class ObjectChangedError(PermanentError):
    """The object was overwritten since it was registered: its ETag no longer matches the row's.

    Permanent for that row (its bytes are gone), so scoring marks it ``superseded`` and registers the
    current version instead of scoring the new bytes under the old row.
    """

    def __init__(self, message: str, *, expected_etag: str, current_etag: str | None = None) -> None:
        super().__init__(message)
        self.expected_etag = expected_etag
        self.current_etag = current_etag
