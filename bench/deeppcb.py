"""The labelled DeepPCB subset used by benchmarks and tests (fixed by its folders; see the datasets README)."""

from __future__ import annotations

from pathlib import Path

from bench.magnetic_tile import DATASETS, MagneticTileSplit
from models.datasets import list_images

DEEPPCB = DATASETS / "deeppcb"


def deeppcb_split(root: Path = DEEPPCB) -> MagneticTileSplit:
    """Train on ``train/good``; test on ``test/good`` + ``test/defect``, masks from ``ground_truth/defect``.

    A defective scan has the same file name as the defect-free template of its region, so test ids carry
    their folder (``good/…``, ``defect/…``) to stay unique.
    """
    train = list_images(root / "train" / "good", suffixes=(".jpg",))
    good = [type(r)(f"good/{r.id}", r.path) for r in list_images(root / "test" / "good", suffixes=(".jpg",))]
    bad = [type(r)(f"defect/{r.id}", r.path) for r in list_images(root / "test" / "defect", suffixes=(".jpg",))]
    masks = {r.id: root / "ground_truth" / "defect" / f"{r.path.stem}.png" for r in bad}
    return MagneticTileSplit(train, good, bad, masks)
