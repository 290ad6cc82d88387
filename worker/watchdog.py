"""A watchdog for the pools that cannot enforce ``task_time_limit`` themselves (solo, threads).

Celery's hard time limit is carried out by the prefork parent, which kills the child running the task;
in the solo pool (the GPU default) the task runs in the worker's only process, so a hung model call or a
fetch that never returns ran forever and its batch went to a second worker only after Redis's visibility
timeout. :class:`TaskWatchdog` is a daemon thread that notes when each task started and, when one runs
past the limit, logs it and ends the process with :data:`WATCHDOG_EXIT_CODE` (``os._exit``: a hung thread
cannot be interrupted, and a clean shutdown would wait for it). The supervisor of ``waferwatch worker``
(:mod:`worker.supervisor`) starts a fresh process, and the batch's expired lease re-drives its images
(:mod:`worker.leases`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["WATCHDOG_EXIT_CODE", "TaskWatchdog"]

logger = logging.getLogger(__name__)

#: The exit status of a worker ended by the watchdog (EX_SOFTWARE), distinct from Celery's own 1.
WATCHDOG_EXIT_CODE: Final = 70


class TaskWatchdog:
    """Ends the process when a task runs longer than ``time_limit_s`` (checked every ``poll_s``)."""

    def __init__(
        self,
        time_limit_s: float,
        *,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], Any] = os._exit,
    ) -> None:
        self.time_limit_s = time_limit_s
        self._poll_s = poll_s
        self._clock = clock
        self._exit = exit_process
        self._running: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def task_started(self, task_id: str, name: str) -> None:
        """Note that ``task_id`` began now (the thread is started on the first task)."""
        with self._lock:
            self._running[task_id] = (name, self._clock())
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="task-watchdog", daemon=True)
                self._thread.start()

    def task_finished(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def overdue(self) -> list[tuple[str, str, float]]:
        """``(task id, task name, seconds running)`` of the tasks past the limit."""
        now = self._clock()
        with self._lock:
            return [
                (task_id, name, now - started)
                for task_id, (name, started) in self._running.items()
                if now - started > self.time_limit_s
            ]

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll_s)
            overdue = self.overdue()
            if overdue:
                task_id, name, seconds = overdue[0]
                logger.critical(
                    "watchdog: task %s (%s) has run %.0f s, past task_time_limit_s=%s; exiting with code %d "
                    "so the supervisor restarts the worker and the lease redrive re-sends its images",
                    name,
                    task_id,
                    seconds,
                    self.time_limit_s,
                    WATCHDOG_EXIT_CODE,
                )
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                self._exit(WATCHDOG_EXIT_CODE)
                return
