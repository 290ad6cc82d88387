"""The label-free gate check on real data: synthetic-anomaly recall of clean and damaged-trained models.

Prints (not a test), for models fitted on Dacon training images (2 folds, 2% coreset: the pipeline
tests' recipe) and graded on 30 other training images held out of every fit, with one synthetic anomaly
(``models.synthetic``: cut-paste, scar, Perlin blend; seed 0) made from each:

* the threshold, the share of held-out nominal images flagged, and the share of synthetic anomalies
  flagged (``synthetic_recall``, the gate's label-free floor) for
  A: 20 clean images, B: 48 clean images, C: 28 clean + 20 damaged (a black square pasted in each),
  D: 8 clean + 20 damaged.

A damaged training pool raises the calibrated threshold (the folds' validation maxima include damage), so
the model flags far fewer synthetic defects; that is what holds such a candidate back without labels.
Usage: ``python bench/bench_gate.py`` (about 10 minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.magnetic_tile import DATASETS
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import read_image_csv
from models.images import load_image_file
from models.synthetic import synthetic_anomalies

CONFIG = PatchCoreConfig(coreset_ratio=0.02, folds=2)


def black_square(path: Path, index: int) -> bytes:
    """A training image with a pasted black square, at a position that depends on ``index``."""
    image = Image.open(path).convert("RGB")
    side = image.width // 4
    x, y = (index * 37) % (image.width - side), (index * 53) % (image.height - side)
    image.paste((0, 0, 0), (x, y, x + side, y + side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    refs = sorted(read_image_csv(DATASETS / "dacon-semiconductor" / "train.csv"), key=lambda ref: ref.id)
    held = refs[150:180]
    nominal = [load_image_file(ref.path) for ref in held]
    ids = [ref.id for ref in held]
    synthetic = [anomaly.image for anomaly in synthetic_anomalies(nominal, ids, seed=0)]
    clean = [(ref.id, ref.path.read_bytes()) for ref in refs[:48]]
    damaged = [(f"damaged-{i}", black_square(ref.path, i + 7)) for i, ref in enumerate(refs[60:80])]
    pools = {
        "A: 20 clean": clean[:20],
        "B: 48 clean": clean,
        "C: 28 clean + 20 damaged": clean[:28] + damaged,
        "D: 8 clean + 20 damaged": clean[:8] + damaged,
    }
    print(f"held out: {len(held)} Dacon training images; {len(synthetic)} synthetic anomalies made from them")
    for name, pool in pools.items():
        started = time.perf_counter()
        model = FoldEnsemble.fit([i for i, _ in pool], [(lambda d=d: d) for _, d in pool], CONFIG, device="cpu")
        n_scores = np.array([s.score for s in model.score_images(nominal, ids, with_maps=False)])
        s_scores = np.array([s.score for s in model.score_images(synthetic, [f"{i}~s" for i in ids], with_maps=False)])
        print(f"{name}: threshold {model.threshold:.3f}, held-out flag rate {np.mean(n_scores > model.threshold):.2f}, "
              f"synthetic recall {np.mean(s_scores > model.threshold):.2f} ({time.perf_counter() - started:.0f} s)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
