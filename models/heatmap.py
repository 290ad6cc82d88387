"""Heatmap overlays people look at: the anomaly map in a colour scale over the original image.

The pipeline stores the map itself (:func:`encode_map`: an 8-bit grayscale PNG of a few kB and the two
scores its levels span) and draws the overlay only when someone looks (:func:`render_stored`): encoding a
224² RGB overlay for every image cost the worker more CPU than the model needs on a GPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.images import resize_for_model

#: The colour scale of every overlay, as multiples of the threshold: below LOW nothing is painted, the
#: threshold sits at 60% of the bar, HIGH and above are the hottest colour.
LOW, HIGH = 0.7, 1.2

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


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.6, scale: bool = True
) -> Image.Image:
    """The map over the image at the image's own size, on a fixed scale from 0.7× to 1.2× the threshold.

    Opacity follows the score, so nominal regions keep the original pixels and only what approaches or
    exceeds the threshold is painted: the eye goes to the defect, and heatmaps of different images compare.
    With ``scale`` a colour bar is added on the right (see :func:`add_colour_scale`), so a reader can tell
    what a colour means without knowing the convention.
    """
    low, high = LOW * threshold, HIGH * threshold
    heat = colorize(anomaly_map, low=low, high=high).resize(image.size, Image.Resampling.BILINEAR)
    levels = np.clip((np.asarray(anomaly_map, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    mask = Image.fromarray((levels * alpha * 255).round().astype(np.uint8), mode="L")
    blended = Image.composite(heat, image.convert("RGB"), mask.resize(image.size, Image.Resampling.BILINEAR))
    return add_colour_scale(blended, low=low, high=high, threshold=threshold) if scale else blended


def scale_width(height: int) -> int:
    """Width in pixels of the colour bar and its labels beside an overlay ``height`` pixels high."""
    return max(40, height // 5)


def add_colour_scale(image: Image.Image, *, low: float, high: float, threshold: float) -> Image.Image:
    """``image`` with a vertical colour bar on its right: the ramp from ``low`` (bottom) to ``high`` (top),
    labelled with those scores and a white mark with the threshold's value where the decision flips."""
    height = image.height
    width = scale_width(height)
    bar = max(6, width // 4)
    canvas = Image.new("RGB", (image.width + width, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    rows = np.linspace(1.0, 0.0, height)  # top = high
    ramp = _RAMP[(rows * 255).round().astype(np.uint8)]
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar, axis=1), mode="RGB"), (image.width + 2, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, min(14, height // 16)))
    text_x = image.width + bar + 4
    mark = round((high - threshold) / max(high - low, 1e-12) * (height - 1))
    draw.line([(image.width + 2, mark), (image.width + 1 + bar, mark)], fill=(255, 255, 255), width=2)
    for value, y, anchor in ((high, 0, "la"), (threshold, mark, "lm"), (low, height - 1, "ld")):
        draw.text((text_x, y), f"{value:.3g}", fill=(0, 0, 0), font=font, anchor=anchor)
    return canvas


def heatmap_png(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float) -> bytes:
    """The overlay PNG every command and the pipeline store: drawn at the anomaly map's resolution (what the
    model saw; a larger image is first shrunk to it), with the colour scale, at zlib level 1.

    Blending at the original size with default compression costs about 100 ms for a 512² image on one
    core, as long as the model itself spends per image; at the map's size (224²) and level 1 it is about
    15 ms and 75 kB, and shows the same information. One function, so ``score --heatmaps`` and the
    pipeline write overlays of the same size and scale.
    """
    height, width = anomaly_map.shape[:2]
    if image.width * image.height > width * height:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    overlay(image, anomaly_map, threshold=threshold).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def overlay_png(image: Image.Image, anomaly_map: np.ndarray, *, threshold: float, alpha: float = 0.6) -> bytes:
    buffer = io.BytesIO()
    overlay(image, anomaly_map, threshold=threshold, alpha=alpha).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


#: Side of a stored anomaly map, in pixels. Maps are blurred with σ = 4 px at the model's 224² input, so a
#: 4× smaller grid keeps what the eye sees at a sixteenth of the pixels (about 2.5 kB as PNG): Lanczos down,
#: bicubic back up is within 1.2% of the map's range everywhere even for a map of independent random patch
#: scores (the worst case; box down and bilinear up were 5.8% off), 0.2% more for the 8-bit levels.
STORED_MAP_SIZE = 56


@dataclass(frozen=True, slots=True)
class StoredMap:
    """An anomaly map as stored with its score: PNG bytes (8-bit grayscale), level 0 is ``low`` and 255 is
    ``high`` (score units; the map's own minimum and maximum)."""

    png: bytes
    low: float
    high: float


def stored_map_of(png: bytes | None, low: float | None, high: float | None) -> StoredMap | None:
    """A :class:`StoredMap` from its three stored columns; None when any is missing (rows scored without a
    map, or before maps were stored)."""
    if png is None or low is None or high is None:
        return None
    return StoredMap(bytes(png), float(low), float(high))


def encode_map(anomaly_map: np.ndarray, *, size: int = STORED_MAP_SIZE) -> StoredMap:
    """The map shrunk to at most ``size``² (Lanczos) and quantised to 8 bits over its own range (0.2 ms)."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    height, width = values.shape[:2]
    plane = Image.fromarray(values, mode="F")
    if max(height, width) > size:
        scale = size / max(height, width)
        plane = plane.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    small = np.asarray(plane, dtype=np.float32)
    low, high = float(small.min()), float(small.max())
    span = high - low
    levels = np.zeros(small.shape, dtype=np.uint8) if span <= 0 else np.rint((small - low) * (255.0 / span))
    buffer = io.BytesIO()
    Image.fromarray(levels.astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return StoredMap(buffer.getvalue(), low, high)


def decode_map(stored: StoredMap, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """The stored map in score units (float32), resized (bicubic) to ``size`` = (width, height) if given."""
    with Image.open(io.BytesIO(stored.png)) as image:
        levels = image.convert("L")
    plane = Image.fromarray(np.asarray(levels, dtype=np.float32), mode="F")
    if size is not None and plane.size != tuple(size):
        plane = plane.resize(tuple(size), Image.Resampling.BICUBIC)
    span = stored.high - stored.low
    return (np.asarray(plane, dtype=np.float32) * np.float32(span / 255.0) + np.float32(stored.low)).astype(np.float32)


def render_stored(image: Image.Image, stored: StoredMap, *, threshold: float, size: int) -> bytes:
    """The overlay PNG of a stored map, as the worker drew it before maps were stored: the image at the
    model's input ``size``² (bilinear, as the model saw it), the map brought back to that size, the same
    colour scale (:func:`heatmap_png`)."""
    image = resize_for_model(image.convert("RGB"), size)
    return heatmap_png(image, decode_map(stored, size=(size, size)), threshold=threshold)
