"""How many CPU threads one scoring process uses, for torch and faiss together."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss
import torch

__all__ = ["one_torch_thread", "set_cpu_threads"]


def set_cpu_threads(threads: int) -> None:
    """Limit torch's intra-op pool and faiss's OpenMP pool to ``threads``.

    Several scoring processes on one CPU must split the cores between them: with every process using every
    core, their OpenMP pools preempt each other and spin at barriers. Measured on the 2-core dev machine
    (``bench/bench_pipeline.py``, back-to-back runs, 300 images): two scoring processes of one thread each
    used 54 ms of CPU per image against 75 ms for one process of two threads, and drained a backlog 1.2×
    faster.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run a loop of many small torch operations on one intra-op thread, then restore the thread count.

    Operations on a few thousand to a few ten thousand floats are too small to split: a second thread only
    adds hand-offs and barrier waits (measured where it is used: the greedy coreset and ReConPatch training).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
