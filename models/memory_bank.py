"""A fold's memory bank: the coreset patch features, searched exactly (faiss on a CPU, a matrix product on a GPU)."""

from __future__ import annotations

import faiss
import numpy as np
import torch

#: Below this many multiply-adds a CPU search runs on one thread: starting faiss's OpenMP team (which
#: competes with torch's for the same cores) costs more than tiny searches such as eq. 7's one query per
#: image. A batch's patch search (32 images × 196 patches against a 334-entry bank: 3·10⁸) is well above it
#: and runs in parallel (measured on 2 cores: 61 ms for the 5 folds vs 93 ms on one thread).
_PARALLEL_SEARCH_WORK = 50_000_000

#: Squared distances one device search holds at once (queries × entries, float32): 64 MB. A tiled batch's
#: patches against a large bank are searched in blocks of queries, so GPU memory stays bounded; the default
#: batch (32 images × 196 patches against a 334-entry bank) is one block of 8 MB.
_SEARCH_BLOCK_ELEMENTS = 16 * 2**20


class MemoryBank:
    """Exact L2 nearest neighbours over ``vectors`` (n_entries, embed_dim).

    On a CPU the search is faiss's ``IndexFlatL2``. On a GPU model the banks are searched on the GPU
    (:meth:`search_by_product`), so a GPU host's CPU does none of it: with faiss the five folds cost that
    CPU 0.7–1.2 ms per image (2 or 1 threads), a sixth to a quarter of the 5 ms the whole worker may
    spend around the model, and a GPU faiss would be a second CUDA library to keep in step with torch's
    (Meta ships it for conda only). The same product on a CPU is about 1.5× slower than faiss
    (``bench/bench_search.py`` on the 2-core dev machine, five folds, ``k = 1``: 1.73–1.94 against
    1.21–1.26 ms per image on one thread), so the CPU keeps faiss. Both give the same neighbours, with
    distances within float32 rounding of each other (tested against a float64 brute force).

    Exact rather than approximate search keeps scores reproducible and independent of index training; the
    banks are small after coreset subsampling.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"a memory bank needs a non-empty 2-D array, got shape {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.vectors.shape[1])
        self.index.add(self.vectors)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_entries(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(
        self, queries: np.ndarray, k: int, *, device: torch.device | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest entries of each query: L2 distances (n_queries, k) ascending, and their indices.

        ``device``: the model's GPU to search on (:meth:`search_by_product`); None or a CPU: faiss.
        """
        if device is not None and device.type != "cpu":
            return self.search_by_product(queries, k, device=device)
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

    def search_by_product(self, queries: np.ndarray, k: int, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` as torch matrix products on ``device`` (the GPU path; it runs on a CPU too, for tests).

        Ranks ``‖v‖² − 2 q·v`` per block of queries, keeps the ``k`` smallest (a row minimum for the default
        ``k = 1``, a third of a top-k's time) and adds ``‖q‖²`` to those only: it is the same for every entry
        of a row, so it cannot change the ranking.
        """
        k = min(k, self.n_entries)
        vectors, squared_norms = self._tensors_on(device)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not queries.flags.writeable:  # a memory-mapped feature file: torch will not wrap read-only memory
            queries = queries.copy()
        all_queries = torch.from_numpy(queries).to(device)
        rows = max(1, _SEARCH_BLOCK_ELEMENTS // self.n_entries)
        distances, indices = [], []
        with torch.inference_mode():
            for begin in range(0, all_queries.shape[0], rows):
                block = all_queries[begin : begin + rows]
                ranking = torch.addmm(squared_norms.unsqueeze(0), block, vectors.T, alpha=-2.0)
                if k == 1:
                    nearest, index = ranking.min(dim=1, keepdim=True)
                else:
                    nearest, index = torch.topk(ranking, k, dim=1, largest=False, sorted=True)
                nearest += (block * block).sum(dim=1, keepdim=True)
                distances.append(nearest.clamp_(min=0.0).sqrt_())  # the expansion can dip slightly below zero
                indices.append(index)
        if not distances:
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        return torch.cat(distances).cpu().numpy(), torch.cat(indices).cpu().numpy()

    def _tensors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries and their squared norms on ``device`` (kept: a bank is searched once per batch)."""
        if device not in self._on_device:
            vectors = torch.from_numpy(self.vectors).to(device)
            self._on_device[device] = (vectors, (vectors * vectors).sum(dim=1))
        return self._on_device[device]
