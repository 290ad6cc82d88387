"""Decoding images safely and turning them into normalised tensors.

Every failure of an input image becomes a :class:`~models.errors.BadImageError` naming the image, so the
pipeline can record it and move on instead of crashing a worker.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from models.errors import BadImageError

# Never decode partial files silently: a truncated upload must be reported, not scored as half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = 64_000_000) -> Image.Image:
    """Decode bytes into an RGB :class:`PIL.Image.Image`.

    Grayscale, palette, 16-bit and RGBA images are converted to RGB (alpha composited on black, as a
    transparent background carries no texture). The pixel count is checked from the header *before*
    decoding, against decompression bombs.
    """
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            if width < 1 or height < 1:
                raise BadImageError(name, f"degenerate size {width}x{height}")
            image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        raise BadImageError(name, "not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(name, f"refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(name, f"cannot be decoded, probably truncated or corrupt ({exc})") from exc
    return _to_rgb(image)


def load_image_file(path: str | Path, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Read and decode an image file; a missing file is a :class:`BadImageError` too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(str(path), f"cannot be read ({exc.strerror or exc})") from exc
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(
    image: Image.Image,
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Resize to ``image_size``² (bilinear, antialiased) and normalise: a float32 tensor of shape (3, S, S).

    Pillow does the resize on uint8 so the result is bit-identical on every OS and CPU.
    """
    return to_batch([image], image_size=image_size, mean=mean, std=std)[0]


def resize_for_model(image: Image.Image, image_size: int) -> Image.Image:
    """The image at the model's input size (bilinear), exactly as :func:`to_batch` resizes it.

    Callers that resize ahead of time (the worker does it on its fetch threads, and reuses the result for the
    heatmap) get the same scores: an image already at the size passes through untouched.
    """
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def to_batch(
    images: Sequence[Image.Image],
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Resize and normalise a batch: (n_images, 3, S, S) float32, normalised in one vectorised step."""
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    if len(images) > 1 and any(img.size != (image_size, image_size) for img in images):
        # Pillow releases the GIL while resizing, so a batch resizes on every core.
        with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
            resized = list(pool.map(lambda img: np.asarray(resize_for_model(img, image_size)), images))
    else:
        resized = [np.asarray(resize_for_model(img, image_size)) for img in images]
    pixels = np.stack(resized)
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, 3, 1, 1)
    return (batch * scale - shift).contiguous()
