"""A fold's memory bank: the coreset patch features behind an exact faiss k-NN index."""

from __future__ import annotations

import faiss
import numpy as np

#: Below this many multiply-adds a search runs on one thread: starting faiss's OpenMP team (which competes
#: with torch's for the same cores) costs more than tiny searches such as eq. 7's one query per image. A
#: batch's patch search (32 images × 196 patches against a 334-entry bank: 3·10⁸) is well above it and
#: runs in parallel (measured on 2 cores: 61 ms for the 5 folds vs 93 ms on one thread).
_PARALLEL_SEARCH_WORK = 50_000_000


class MemoryBank:
    """Exact L2 nearest neighbours over ``vectors`` (n_entries, embed_dim) with faiss ``IndexFlatL2``.

    Exact rather than approximate search keeps scores reproducible bit for bit on the same machine and
    independent of index training; the banks are small after coreset subsampling.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"a memory bank needs a non-empty 2-D array, got shape {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.vectors.shape[1])
        self.index.add(self.vectors)

    @property
    def n_entries(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest entries of each query: L2 distances (n_queries, k) ascending, and their indices."""
        k = min(k, self.n_entries)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[0] * self.n_entries * self.embed_dim < _PARALLEL_SEARCH_WORK:
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                squared, indices = self.index.search(queries, k)
            finally:
                faiss.omp_set_num_threads(threads)
        else:
            squared, indices = self.index.search(queries, k)
        # faiss computes ||q||² + ||v||² - 2 q·v, which can dip slightly below zero.
        return np.sqrt(np.maximum(squared, 0.0)), indices
