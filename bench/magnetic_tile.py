"""The labelled magnetic-tile split used by benchmarks and tests (fixed, hash-based, OS-independent)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from models.datasets import ImageRef, list_images, stable_split

DATASETS = Path(
    os.environ.get("WAFERWATCH_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets")
)
MAGNETIC_TILE = DATASETS / "magnetic-tile"
DEFECT_FOLDERS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
TRAIN_FRACTION = 0.6


@dataclass(frozen=True)
class MagneticTileSplit:
    train: list[ImageRef]
    test_good: list[ImageRef]
    test_bad: list[ImageRef]
    masks: dict[str, Path]


def magnetic_tile_split(root: Path = MAGNETIC_TILE) -> MagneticTileSplit:
    """Train on a fixed 60% of MT_Free; test on the other 40% plus every defective image."""
    free = list_images(root / "MT_Free" / "Imgs", suffixes=(".jpg",))
    train, test_good = stable_split(free, TRAIN_FRACTION)
    bad: list[ImageRef] = []
    masks: dict[str, Path] = {}
    for folder in DEFECT_FOLDERS:
        for ref in list_images(root / folder / "Imgs", suffixes=(".jpg",)):
            bad.append(ref)
            masks[ref.id] = ref.path.with_suffix(".png")
    for ref in test_good:
        masks[ref.id] = ref.path.with_suffix(".png")
    return MagneticTileSplit(train, test_good, sorted(bad, key=lambda r: r.id), masks)


def subsample(refs: list[ImageRef], n: int) -> list[ImageRef]:
    """Every k-th image (deterministic), at most ``n``."""
    if len(refs) <= n:
        return list(refs)
    step = len(refs) / n
    return [refs[int(i * step)] for i in range(n)]
