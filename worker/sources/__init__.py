"""Event sources: turn upstream notifications into ``ObjectEvent`` lists for a ``submit`` callback.

Every source follows the same contract (at-least-once delivery):

1. take a notification from upstream (SQS message, HTTP POST, Redis list element, a
   stable file in a folder);
2. parse it with ``worker.events.parse_notification``;
3. call ``submit(events)`` -- the caller's code that registers images and enqueues
   tasks -- only with a non-empty list;
4. acknowledge/delete the upstream message only after ``submit`` returned.

If ``submit`` raises, the message stays upstream and comes back later, and the
source raises ``EventSubmitError`` (transient) chained to the cause.  Duplicates are
harmless downstream (images are unique on bucket, key, etag); losses are not.
A message that can never be parsed (``BadEventError``) is logged with its id and a
body excerpt, then dropped, because redelivering it can only fail again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker.errors import WaferwatchError
from worker.events import ObjectEvent

Submit = Callable[[list[ObjectEvent]], None]
"""The caller's callback; it must raise if the events were not durably handed over."""

logger = logging.getLogger(__name__)


def run_until_stopped(
    poll_once: Callable[[], int],
    stop_event: threading.Event,
    *,
    name: str,
    idle_wait_s: float = 0.0,
    max_backoff_s: float = 30.0,
) -> None:
    """Call ``poll_once`` until ``stop_event`` is set, backing off after domain errors.

    A ``WaferwatchError`` (queue down, submit failed, share unmounted) is logged with
    its traceback and retried after an exponential backoff: the message it concerned
    is still upstream, so nothing is lost by continuing.  Any other exception is a
    bug and propagates so the process supervisor sees the crash.
    """
    backoff_s = 0.5
    while not stop_event.is_set():
        try:
            handled = poll_once()
        except WaferwatchError:
            logger.exception("%s: poll failed; retrying in %.1f s", name, backoff_s)
            stop_event.wait(backoff_s)
            backoff_s = min(backoff_s * 2, max_backoff_s)
            continue
        backoff_s = 0.5
        if handled == 0 and idle_wait_s > 0:
            stop_event.wait(idle_wait_s)


__all__ = ["Submit", "run_until_stopped"]
