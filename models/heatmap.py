"""Heatmap overlays people look at: the anomaly map in a colour scale over the original image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A perceptually ordered dark-blue → yellow → red ramp (sampled from "inferno"-like stops), 256 entries.
_STOPS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_RAMP = np.stack(
    [np.interp(np.linspace(0, len(_STOPS) - 1, 256), np.arange(len(_STOPS)), _STOPS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)


def colorize(anomaly_map: np.ndarray, *, low: float, high: float) -> Image.Image:
    """Map scores to colours on a fixed scale [low, high] (use the threshold for comparable heatmaps)."""
    span = max(high - low, 1e-12)
    levels = np.clip((anomaly_map - low) / span, 0.0, 1.0)
    return Image.fromarray(_RAMP[(levels * 255).round().astype(np.uint8)], mode="RGB")


def overlay(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.5) -> Image.Image:
    """Blend the colourised map (scaled so the threshold sits at the top of the ramp's orange) over the
    image at the image's own size."""
    heat = colorize(anomaly_map, low=0.0, high=threshold * 1.25).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def overlay_png(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    overlay(image, anomaly_map, threshold=threshold, alpha=alpha).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
