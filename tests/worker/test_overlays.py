"""worker.overlays: the model's input side from a manifest, and drawing a stored map without its image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.heatmap import encode_map, scale_width
from models.tiling import plan_tiles
from worker.overlays import DEFAULT_INPUT_SIZE, input_size_from_manifest, render_map


@pytest.mark.parametrize(
    ("tiles", "image_size", "overlap", "cells"),
    [
        (1, 224, 0.0, (28, 28)),
        (2, 256, 0.1, (8, 8)),
        (3, 224, 0.0, (28, 28)),
        (3, 224, 0.25, (28, 28)),
        (4, 224, 0.5, (14, 14)),
    ],
)
def test_input_size_is_the_canvas_the_model_was_fed(
    tiles: int, image_size: int, overlap: float, cells: tuple[int, int]
) -> None:
    """Tiled models score a canvas larger than image_size; the manifest's grid is enough to recompute it."""
    layout = plan_tiles(tiles, image_size, overlap, cells)
    manifest = {
        "config": {"image_size": image_size, "tiles": tiles, "tile_overlap": overlap},
        "grid": list(layout.grid),
    }
    assert input_size_from_manifest(manifest) == layout.canvas


def test_input_size_without_a_manifest_is_the_config_default() -> None:
    assert input_size_from_manifest(None) == input_size_from_manifest({}) == DEFAULT_INPUT_SIZE == 224
    assert input_size_from_manifest({"config": {"image_size": 320}}) == 320


def test_undecodable_original_gives_the_map_alone_and_says_why() -> None:
    values = np.zeros((64, 64), dtype=np.float32)
    values[:16, :16] = 1.0
    rendered = render_map(encode_map(values), threshold=0.5, size=64, original=b"not an image", name="k.png")
    assert not rendered.over_image and rendered.problem is not None and "does not decode" in rendered.problem
    with Image.open(io.BytesIO(rendered.png)) as image:
        assert image.size == (64 + scale_width(64), 64)
        rgb = image.convert("RGB")
        assert sum(rgb.getpixel((4, 4))) > sum(rgb.getpixel((50, 50))) + 300  # hot corner vs nominal
