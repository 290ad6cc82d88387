"""How many CPU threads one scoring process uses, for torch and faiss together."""

from __future__ import annotations

import faiss
import torch

__all__ = ["set_cpu_threads"]


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
