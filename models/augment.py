"""Nominal-bank augmentation: mirrored and turned copies of the training images, for symmetric products.

A memory bank only knows the appearances it was shown. Where the product looks the same mirrored or turned
by 90° (a tile surface, a board region, a wafer die without orientation marks), those copies of each
nominal image are free extra nominal data. Where it does not (a packaged transistor with its leads pointing
down), a mirrored image *is* a defect, so the option is off by default and only a user who knows the product
turns it on.

The copies are made on the preprocessed square canvas, so every copy has the model's input size whatever
the image's aspect ratio, and they go through the same backbone pass as the originals. Only fold banks see
them: validation scores, thresholds and scoring use the images as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]

#: The copies added per image for each ``PatchCoreConfig.augment`` value, in a fixed order (names are for logs).
TRANSFORMS: dict[str, tuple[tuple[str, Transform], ...]] = {
    "none": (),
    "flips": (
        ("mirror left-right", lambda x: torch.flip(x, dims=(-1,))),
        ("mirror top-bottom", lambda x: torch.flip(x, dims=(-2,))),
    ),
    "dihedral": (
        ("mirror left-right", lambda x: torch.flip(x, dims=(-1,))),
        ("mirror top-bottom", lambda x: torch.flip(x, dims=(-2,))),
        ("turn 90°", lambda x: torch.rot90(x, 1, dims=(-2, -1))),
        ("turn 180°", lambda x: torch.rot90(x, 2, dims=(-2, -1))),
        ("turn 270°", lambda x: torch.rot90(x, 3, dims=(-2, -1))),
        ("mirror on the diagonal", lambda x: x.transpose(-2, -1)),
        ("mirror on the anti-diagonal", lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1)),
    ),
}


def copies_per_image(augment: str) -> int:
    """Extra bank copies each training image contributes (0 without augmentation)."""
    return len(TRANSFORMS[augment])


def augmented_batches(batch: torch.Tensor, augment: str) -> list[torch.Tensor]:
    """The copies of a preprocessed batch (n, 3, S, S), one tensor per transform, in :data:`TRANSFORMS` order."""
    return [transform(batch).contiguous() for _, transform in TRANSFORMS[augment]]
