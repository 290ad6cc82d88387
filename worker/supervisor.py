"""``waferwatch worker`` runs Celery as a child process and restarts it when it dies.

The Celery main process can die on its own: a Redis restart while a task is unacknowledged ends it with
``Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")`` (kombu's Redis
transport, celery/celery#9250), the solo-pool watchdog ends it on a hung task (exit code 70), the OOM
killer ends it with SIGKILL. Before, a bare ``waferwatch worker`` then stayed dead; in compose, the
container's restart policy was the only remedy. :func:`supervise` restarts the child after a non-zero exit
with exponential backoff (``backoff_s`` doubling up to ``backoff_max_s``; back to ``backoff_s`` once a
child ran ``healthy_after_s``), so a broker that is down for minutes is not hammered. A child that exits
0 (a warm shutdown) ends the supervisor with 0. SIGTERM, SIGINT and SIGQUIT are passed on to the child
(SIGTERM is Celery's warm shutdown: the batch in flight finishes) and stop the restarts.
``waferwatch worker --no-supervise`` runs the raw Celery process, for a process manager of one's own.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["supervise"]

logger = logging.getLogger(__name__)

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def supervise(
    command: Sequence[str],
    *,
    backoff_s: float = 1.0,
    backoff_max_s: float = 30.0,
    healthy_after_s: float = 10.0,
    max_restarts: int | None = None,
) -> int:
    """Run ``command`` until it exits 0 or a stop signal arrives, restarting it after a non-zero exit.

    Returns the exit status of the last child (0 after a warm shutdown). ``max_restarts`` (None: no
    limit) bounds the restarts, for tests and for operators who prefer their own process manager's policy.
    """
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    delay, restarts = backoff_s, 0
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(list(command))
            code = child.wait()
            if stopping.is_set() or code == 0:
                return code
            if max_restarts is not None and restarts >= max_restarts:
                logger.error("worker exited with %s; %d restarts used, giving up", _describe(code), restarts)
                return code if code > 0 else 128 - code
            if time.monotonic() - started >= healthy_after_s:
                delay = backoff_s
            logger.warning("worker exited with %s; restarting it in %.1f s", _describe(code), delay)
            print(f"supervisor: worker exited with {_describe(code)}; restarting in {delay:.1f} s", flush=True)
            if stopping.wait(delay):
                return code if code > 0 else 128 - code
            delay = min(backoff_max_s, delay * 2)
            restarts += 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _describe(code: int) -> str:
    """``code 70`` or ``signal SIGKILL`` (Popen gives -N for a child ended by signal N)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
