"""Watch a local or network-mounted directory and emit an event per new, stable file.

Inspection tools often write to an SMB/NFS share, and inotify (or any kernel
notification API) does not report changes made by *other* hosts on a network
file system, so this watcher polls: it lists the tree, and a file is emitted once
it has been seen with the same (size, mtime) on two polls at least
``stable_after_s`` apart -- a file still being written changes between polls and
is not picked up half-written.  Hidden and temp files (``.*``, ``*.tmp``,
``*.part``) are ignored, since uploaders write those and rename at the end.

Each (key, size, mtime) is emitted once per process.  State lives in memory, so a
restart emits every existing file again: duplicates the ``images`` uniqueness
rule absorbs (same bytes, same MD5 ETag), never a loss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from worker.errors import EventSubmitError, ObjectMissingError
from worker.events import ObjectEvent
from worker.sources import Submit, run_until_stopped
from worker.storage import FolderStore, iter_folder_files

logger = logging.getLogger(__name__)

_EVENT_NAME = "ObjectCreated:Put"


@dataclass(frozen=True, slots=True)
class _Sighting:
    """A file's signature and when it was first seen with that signature."""

    size: int
    mtime_ns: int
    first_seen: float


class FolderWatcher:
    """Polling watcher over ``root``; emits ``ObjectEvent`` values whose ETag matches ``FolderStore``."""

    def __init__(
        self,
        root: Path,
        *,
        submit: Submit,
        prefix: str = "",
        bucket_name: str | None = None,
        stable_after_s: float = 1.0,
        poll_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.bucket_name = bucket_name or self.root.name
        self.stable_after_s = stable_after_s
        self.poll_interval_s = poll_interval_s
        self._submit = submit
        self._clock = clock
        self._store = FolderStore(self.root, bucket=self.bucket_name)
        self._pending: dict[str, _Sighting] = {}
        self._emitted: dict[str, tuple[int, int]] = {}

    def poll_once(self) -> int:
        """Scan once and submit the files that became stable, in key order; returns how many.

        If ``submit`` raises, the files are not marked as emitted (they are offered
        again on the next poll) and ``EventSubmitError`` is raised.
        """
        now = self._clock()
        ready: list[ObjectEvent] = []
        present: set[str] = set()
        for key, stat in iter_folder_files(self.root, self.prefix):
            present.add(key)
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._emitted.get(key) == signature:
                continue
            seen = self._pending.get(key)
            if seen is None or (seen.size, seen.mtime_ns) != signature:
                self._pending[key] = _Sighting(stat.st_size, stat.st_mtime_ns, now)
                continue
            if now - seen.first_seen < self.stable_after_s:
                continue
            event = self._event_for(key, signature)
            if event is not None:
                ready.append(event)
        self._forget_missing(present)
        if not ready:
            return 0
        try:
            self._submit(ready)
        except Exception as exc:
            raise EventSubmitError(
                f"submit failed for {len(ready)} files under {self.root} ({type(exc).__name__}: {exc}); "
                "they will be offered again on the next poll"
            ) from exc
        for event in ready:
            sighting = self._pending.pop(event.key)
            self._emitted[event.key] = (sighting.size, sighting.mtime_ns)
        return len(ready)

    def run(self, stop_event: threading.Event) -> None:
        """Poll every ``poll_interval_s`` until ``stop_event`` is set."""

        def poll() -> int:
            handled = self.poll_once()
            stop_event.wait(self.poll_interval_s)
            return handled

        run_until_stopped(poll, stop_event, name=f"folder {self.root}")

    def _event_for(self, key: str, signature: tuple[int, int]) -> ObjectEvent | None:
        """Build the event; ``None`` if the file changed or vanished while hashing it."""
        try:
            info = self._store.head(key)
        except ObjectMissingError:
            self._pending.pop(key, None)
            return None
        if info.size != signature[0]:
            self._pending.pop(key, None)
            return None
        return ObjectEvent(
            bucket=self.bucket_name,
            key=key,
            etag=info.etag,
            version_id=None,
            size=info.size,
            event_name=_EVENT_NAME,
            event_time=datetime.fromtimestamp(signature[1] / 1e9, tz=UTC),
        )

    def _forget_missing(self, present: set[str]) -> None:
        """Drop state of deleted files so a re-created file is emitted again."""
        for table in (self._pending, self._emitted):
            for key in [key for key in table if key not in present]:
                del table[key]
