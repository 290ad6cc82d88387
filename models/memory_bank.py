"""A fold's memory bank: the coreset patch features behind an exact faiss k-NN index."""

from __future__ import annotations

import faiss
import numpy as np


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
        squared, indices = self.index.search(queries, k)
        # faiss computes ||q||² + ||v||² - 2 q·v, which can dip slightly below zero.
        return np.sqrt(np.maximum(squared, 0.0)), indices
