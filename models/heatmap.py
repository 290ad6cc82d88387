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


def overlay(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.6) -> Image.Image:
    """The map over the image at the image's own size, on a fixed scale from 0.7× to 1.2× the threshold.

    Opacity follows the score, so nominal regions keep the original pixels and only what approaches or
    exceeds the threshold is painted: the eye goes to the defect, and heatmaps of different images compare.
    """
    low, high = 0.7 * threshold, 1.2 * threshold
    heat = colorize(anomaly_map, low=low, high=high).resize(image.size, Image.Resampling.BILINEAR)
    levels = np.clip((np.asarray(anomaly_map, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    mask = Image.fromarray((levels * alpha * 255).round().astype(np.uint8), mode="L")
    return Image.composite(heat, image.convert("RGB"), mask.resize(image.size, Image.Resampling.BILINEAR))


def overlay_png(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.6) -> bytes:
    buffer = io.BytesIO()
    overlay(image, anomaly_map, threshold=threshold, alpha=alpha).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
