"""Overlays people read: a colour scale beside every heatmap, one size whichever command wrote it."""

import io

import numpy as np
from PIL import Image

from models.heatmap import _RAMP, HIGH, LOW, heatmap_png, overlay, scale_width


def test_overlay_carries_a_colour_scale_from_low_to_high():
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    anomaly_map = np.linspace(0, 2, 224 * 224).reshape(224, 224)
    drawn = np.asarray(overlay(image, anomaly_map, threshold=1.0))
    assert drawn.shape == (224, 224 + scale_width(224), 3)
    bar = drawn[:, 224 + 4]  # a column inside the colour bar
    assert tuple(bar[0]) == tuple(_RAMP[255]) and tuple(bar[-1]) == tuple(_RAMP[0])  # hottest at the top
    mark = round((HIGH - 1.0) / (HIGH - LOW) * 223)
    assert tuple(drawn[mark, 224 + 4]) == (255, 255, 255)  # the threshold is marked


def test_heatmap_png_is_drawn_at_the_maps_size_whatever_the_image_size():
    anomaly_map = np.zeros((224, 224))
    sizes = set()
    for side in (224, 512, 1024):
        png = heatmap_png(Image.new("RGB", (side, side)), anomaly_map, threshold=1.0)
        with Image.open(io.BytesIO(png)) as written:
            sizes.add(written.size)
    assert sizes == {(224 + scale_width(224), 224)}
