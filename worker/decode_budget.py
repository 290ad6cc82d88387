"""A budget of pixels shared by the concurrent decodes of one worker process.

A worker decodes a batch on ``fetch_threads`` threads at once (PNG decoding releases the GIL, so the
decodes really overlap). Memory follows the pixels being decoded, not the bytes downloaded: a 1.4 MB
PNG of 8000² 16-bit pixels holds 128 MB once decoded, and eight of them at once took one process to
11.7 GB (issue 12). The byte and pixel limits are per image; this bounds their sum.

:class:`PixelBudget` is a counting semaphore weighted by pixels: a decode reserves its image's pixel
count (read from the header) and waits while the images being decoded would exceed the budget. An
image larger than the whole budget still runs, alone, so nothing waits forever (the per-image pixel
limit refuses what is too large to decode at all). Ordinary images (512², 0.26 M pixels) never wait.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PixelBudget", "shared_budget"]


class PixelBudget:
    """At most ``capacity`` pixels held by decodes at once (one oversized decode may run alone)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._high_water = 0
        self._condition = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve ``pixels`` for the duration of the block, waiting until they fit."""
        pixels = max(1, int(pixels))
        with self._condition:
            while self._in_use and self._in_use + pixels > self.capacity:
                self._condition.wait()
            self._in_use += pixels
            self._high_water = max(self._high_water, self._in_use)
        try:
            yield
        finally:
            with self._condition:
                self._in_use -= pixels
                self._condition.notify_all()

    @property
    def in_use(self) -> int:
        """Pixels reserved right now."""
        with self._condition:
            return self._in_use

    @property
    def high_water(self) -> int:
        """The most pixels ever reserved at once (what the benchmark and tests check)."""
        with self._condition:
            return self._high_water


_BUDGETS: dict[int, PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def shared_budget(capacity: int) -> PixelBudget:
    """The process-wide budget of this capacity: every batch scored in this process shares it."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(capacity)
        if budget is None:
            budget = _BUDGETS[capacity] = PixelBudget(capacity)
        return budget
