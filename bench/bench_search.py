"""The five folds' bank search on a CPU: faiss against the GPU path's matrix product, side by side.

``MemoryBank.search`` uses faiss on a CPU and ``MemoryBank.search_by_product`` on a GPU. This prints (not a
test) what each costs on this machine's CPU per image, for the default model's five folds on a batch of
Dacon images (``k = 1``, the default), at one thread and at two, and whether they agree (neighbours,
largest relative distance difference).

Each variant runs in a process of its own, alternated over ``--rounds``: faiss's OpenMP pool and torch's
spin against each other, so timing both in one process slows both (about 2×) and says nothing about
either. Usage: ``python bench/bench_search.py [--batch 32] [--k 1] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import cached_dacon_model, dacon_test, median, timed
from models.config import PatchCoreConfig

VARIANTS = ("faiss", "product")


def _patches(batch: int) -> np.ndarray:
    """The batch's patch embeddings as the ensemble searches them (rounded through float16)."""
    from models.images import decode_image

    ensemble = cached_dacon_model(PatchCoreConfig(), device="cpu")
    refs = (dacon_test() * 4)[:batch]
    images = [decode_image(ref.path.read_bytes(), size=ensemble.input_size) for ref in refs]
    embedded = ensemble.extractor.embed(images)
    return embedded.reshape(-1, embedded.shape[-1]).half().float().numpy()


def _child(variant: str, threads: int, k: int, patches_file: Path, out_file: Path) -> None:
    """One variant, one thread count: ms per image for the five folds, and its answers for the comparison."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    patches = np.load(patches_file)
    ensemble = cached_dacon_model(PatchCoreConfig(), device="cpu")
    cpu = torch.device("cpu")

    def search() -> list[tuple[np.ndarray, np.ndarray]]:
        if variant == "faiss":
            return [fold.bank.search(patches, k) for fold in ensemble.folds]
        return [fold.bank.search_by_product(patches, k, device=cpu) for fold in ensemble.folds]

    answers = search()  # warm-up
    seconds = median(timed(search, 15))
    n_images = len(patches) / (ensemble.grid[0] * ensemble.grid[1])
    np.savez(out_file, distances=np.stack([d for d, _ in answers]), indices=np.stack([i for _, i in answers]))
    print(json.dumps({"ms_per_image": seconds / n_images * 1000}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=PatchCoreConfig().k)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "THREADS", "PATCHES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, threads, patches_file, out_file = args.child
        _child(variant, int(threads), args.k, Path(patches_file), Path(out_file))
        return
    with tempfile.TemporaryDirectory() as scratch:
        patches_file = Path(scratch) / "patches.npy"
        np.save(patches_file, _patches(args.batch))
        times: dict[tuple[str, int], list[float]] = {}
        answers: dict[str, Path] = {}
        for threads in (1, 2):
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    out_file = Path(scratch) / f"{variant}.npz"
                    command = [sys.executable, __file__, "--k", str(args.k)]
                    command += ["--child", variant, str(threads), str(patches_file), str(out_file)]
                    result = subprocess.run(command, check=True, capture_output=True, text=True)
                    times.setdefault((variant, threads), []).append(json.loads(result.stdout)["ms_per_image"])
                    answers[variant] = out_file
        faiss_answer, product_answer = (np.load(answers[variant]) for variant in VARIANTS)
        same = float((faiss_answer["indices"] == product_answer["indices"]).mean())
        scale = np.maximum(faiss_answer["distances"], 1e-6)
        relative = float((np.abs(faiss_answer["distances"] - product_answer["distances"]) / scale).max())
    print(f"five folds' search, batch {args.batch}, k={args.k}, ms per image (median of 15 per process):")
    for threads in (1, 2):
        cells = [f"{variant} {', '.join(f'{t:.2f}' for t in times[(variant, threads)])}" for variant in VARIANTS]
        ratio = median(times[("product", threads)]) / median(times[("faiss", threads)])
        print(f"  {threads} thread(s): {'; '.join(cells)}; product ÷ faiss {ratio:.2f}")
    print(f"same neighbours: {same:.1%}; largest relative distance difference {relative:.1e}")


if __name__ == "__main__":
    main()
