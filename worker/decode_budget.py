"""A budget of pixels shared by the concurrent decodes of one worker process.

A worker decodes a batch on ``fetch_threads`` threads at once (PNG decoding releases the GIL, so the
decodes really overlap). Memory follows the pixels being decoded, not the bytes downloaded: a 1.4 MB
PNG of 8000² 16-bit pixels holds 128 MB once decoded, and eight of them at once took one process to
11.7 GB (issue 12). The byte and pixel limits are per image; this bounds their sum.

:class:`PixelBudget` is a counting semaphore weighted by pixels: a decode reserves its image's pixel
count (read from the header) and waits while the images being decoded would exceed the budget. An
image larger than the whole budget still runs, alone, so nothing waits forever (the per-image pixel
limit refuses what is too large to decode at all). Ordinary images (512², 0.26 M pixels) never wait.

A budget alone is not enough with glibc's malloc: each fetch thread gets its own heap arena, and once
a large block has been freed glibc raises its mmap threshold (up to 32 MB), so the next decoded image
is carved from that thread's arena and stays resident after it is freed. Eight threads decoding one
after another then keep eight images' worth of memory. :func:`return_large_buffers_to_the_os` fixes the
threshold, so decoded images (Pillow allocates them in 16 MB blocks) are mapped and unmapped, and memory
follows the budget (``bench/bench_decode_memory.py``).

Fixing the mmap threshold also freezes glibc's trim threshold at its 128 kB default: every time the model
freed its temporaries (a few MB each, under the mmap threshold), the top of the heap went back to the OS,
and the next call faulted it in again, 16 500 minor page faults per image, which took the model from
19 to 38 ms of CPU per image in a one-thread worker. The trim threshold (128 MB) and top pad (32 MB) are
therefore set with it: the model's working memory stays mapped between calls (no faults), while decoded
images, mapped on their own, still leave at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PixelBudget", "return_large_buffers_to_the_os", "shared_budget"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD_BYTES = 128 << 20
TOP_PAD_BYTES = 32 << 20
MMAP_THRESHOLD_BYTES = 8 << 20
"""Allocations from this size up are mapped on their own and returned to the OS when freed: decoded
images and their bands; the model's per-call tensors on a CPU stay below it."""


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


@functools.cache
def return_large_buffers_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (once), and its trim threshold and top pad with it (see
    the module docstring); False where the C library has no ``mallopt`` (musl, macOS), which keeps the
    default behaviour. Forked pool children inherit the setting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    kept = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(_M_TOP_PAD, TOP_PAD_BYTES)
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes) and kept)
