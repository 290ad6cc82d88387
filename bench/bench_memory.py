"""Peak RSS of training as the number of images doubles (each size in a fresh process).

Features are stored as float16 and images are decoded one batch at a time, so peak memory should grow
linearly and slowly: by about n_patches × embed_dim × 2 bytes per image (plus the fold's float32 copy).

    python bench/bench_memory.py [--sizes 50,100,200,400]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from bench.magnetic_tile import MAGNETIC_TILE
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import list_images
n = {n}
refs = list_images(MAGNETIC_TILE / "MT_Free" / "Imgs", suffixes=(".jpg",))[:n]
started = time.perf_counter()
config = PatchCoreConfig(coreset_ratio=0.01)
ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], config, device="cpu")
print(json.dumps({{"n": len(refs), "seconds": time.perf_counter() - started,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,100,200,400")
    args = parser.parse_args()
    rows = []
    print(f"{'images':>7}{'peak RSS MiB':>14}{'Δ MiB/image':>13}{'train s':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        output = subprocess.run(
            [sys.executable, "-c", CHILD.format(root=str(ROOT), n=n)], check=True, capture_output=True, text=True
        ).stdout
        row = json.loads(output.strip().splitlines()[-1])
        delta = (
            "" if not rows else f"{(row['peak_rss_mib'] - rows[-1]['peak_rss_mib']) / (row['n'] - rows[-1]['n']):.2f}"
        )
        rows.append(row)
        print(f"{row['n']:>7}{row['peak_rss_mib']:>14.0f}{delta:>13}{row['seconds']:>9.1f}", flush=True)
    growth = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in itertools.pairwise(rows)]
    print("peak RSS ratio per doubling:", ", ".join(f"{g:.2f}" for g in growth), "(2.0 would be linear in N from 0)")


if __name__ == "__main__":
    main()
