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
from models.png_decoders import PNG_DECODER, decode_plain_png

#: A faster PNG decoder than Pillow's (Wuffs, else libspng: :mod:`models.png_decoders`); None: Pillow
#: decodes everything, the same pixels. Tests switch it off to compare with the Pillow-only path.
_png_decode = decode_plain_png if PNG_DECODER is not None else None

# Never decode partial files silently: a truncated upload must be reported, not scored as half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Decoding for a model input of ``size``² reduces an image by an integer factor first (``Image.reduce``)
#: only when its short side is at least this many times ``size``; the bilinear resize then still averages
#: over >= 4 pixels per output pixel, so the result is indistinguishable from a direct resize (Pillow's
#: ``reducing_gap`` rule, conservatively). Ordinary images (the 512² Dacon set at 224 px) are far below it
#: and decode exactly as before.
REDUCE_GAP = 4

#: A JPEG is decoded at 1/2, 1/4 or 1/8 scale (in the decoder, ``Image.draft``: the IDCT of fewer
#: coefficients, an exact block average) while its short side stays at least this many times ``size``.
#: Measured on 2048² JPEGs made from the Dacon images, to 224 px: decode + resize 11.8 ms at gap 4 (1/2),
#: 8.3 ms at gap 2 (1/4, mean 0.26 and at most 4 levels from the full decode's resize), 6.5 ms at 1/8
#: (mean 0.9, at most 18 levels: visible on sharp edges, so not taken). Training, evaluation and the
#: ``score`` command decode through this same path, so a model sees the pixels it was built from.
JPEG_DRAFT_GAP = 2

#: Rows converted at a time when 16-bit data is reduced to 8 bits: the float copy is one band, not the
#: whole image (an 8000² image as one float64 array is 512 MB, three of them were made).
_ROWS_PER_BAND = 256

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")

#: What :func:`load_pixels` returns: a Pillow image, or the uint8 array of a plain 8-bit PNG.
Pixels = Image.Image | np.ndarray

#: Colour images are resized to the model input by torch's SIMD uint8 kernel where the CPU has it (AVX2
#: and AVX-512; see :func:`_resize_colour`), everything else by Pillow. Training, calibration and
#: scoring share this path, so a model sees the pixels it was built from on the same kind of host.
_TORCH_RESIZES_LIKE_PILLOW = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def image_pixels(data: bytes, *, name: str = "<bytes>") -> int:
    """The pixel count from the header alone (nothing is decoded): what a decode of ``data`` will hold.

    The worker reserves this many pixels of its decode budget before decoding. Undecodable data gives 1
    (the decode that follows reports it properly).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # any failure is reported by decode_image, with its reason
        return 1
    return max(1, width * height)


def decode_image(
    data: bytes, *, name: str = "<bytes>", max_pixels: int = 64_000_000, size: int | None = None
) -> Image.Image:
    """Decode bytes into an RGB :class:`PIL.Image.Image`.

    Grayscale, palette, 16-bit and RGBA images are converted to RGB (alpha composited on black, as a
    transparent background carries no texture). The pixel count is checked from the header *before*
    decoding, against decompression bombs. Multi-frame files (animated GIF/WebP, multi-page TIFF) give
    their first frame.

    ``size``: the caller wants the model input (``size``², exactly :func:`resize_for_model`), so the
    full-size RGB image is never made: a grayscale image is resized before it becomes RGB (the same
    pixels, a third of the memory), and an image at least :data:`REDUCE_GAP` × ``size`` on its short side
    is first reduced by an integer factor, in the JPEG decoder where possible. The same as
    :func:`to_model_input` of :func:`load_pixels`, which the worker calls apart to account for each.
    """
    pixels = load_pixels(data, name=name, max_pixels=max_pixels, size=size)
    if size is None:
        return _to_rgb(as_image(pixels))
    return to_model_input(pixels, size)


def load_pixels(data: bytes, *, name: str = "<bytes>", max_pixels: int = 64_000_000, size: int | None = None) -> Pixels:
    """The decoded pixels in the file's own mode (the first half of :func:`decode_image`): header checks,
    then the decode, reduced in the JPEG decoder (``Image.draft``) when ``size`` allows it.

    A plain 8-bit PNG comes back as the uint8 array the fast decoder made (``(h, w)`` or ``(h, w, 3)``),
    everything else as a Pillow image: :func:`to_model_input` takes either, :func:`as_image` makes an image.
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
            if size is not None and image.format == "JPEG" and _reduction(image.size, size, JPEG_DRAFT_GAP) > 1:
                factor = _reduction(image.size, size, JPEG_DRAFT_GAP)
                image.draft(image.mode, (width // factor, height // factor))
            fast = _decode_plain_png(image, data)
            if fast is not None:
                return fast
            image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        raise BadImageError(name, "not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(name, f"refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(name, f"cannot be decoded, probably truncated or corrupt ({exc})") from exc
    return image


def as_image(pixels: Pixels) -> Image.Image:
    """The Pillow image of what :func:`load_pixels` returned."""
    return Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels


def _decode_plain_png(image: Image.Image, data: bytes) -> np.ndarray | None:
    """An 8-bit grayscale or RGB PNG decoded by Wuffs or libspng (:mod:`models.png_decoders`), or None to
    let Pillow do it.

    Lossless, so the same pixels as Pillow's decoder; measured on the 512² Dacon PNGs: Wuffs 2.5 ms,
    libspng 3.7, Pillow 4.2-5.2, and an array the torch resize takes as it is (``bench/bench_decode.py``).
    Both release the GIL, as Pillow does. Only the plain case is taken: one frame, not interlaced, no
    transparency chunk, 8 bits a sample (Pillow's raw mode is the image mode); anything else (palette,
    16-bit, APNG) and any refusal of the decoder (a truncated file, a bad checksum) go to Pillow, whose
    answer, image or error, is the one recorded, exactly as without this path.
    """
    if _png_decode is None or image.format != "PNG" or image.mode not in ("L", "RGB"):
        return None
    if len(image.tile) != 1 or image.tile[0][3] != image.mode or "interlace" in image.info:
        return None
    if "transparency" in image.info or getattr(image, "is_animated", False):
        return None
    try:
        pixels = _png_decode(data, image.mode == "L")
    except Exception:  # any refusal: Pillow decodes it again and reports its own error
        return None
    expected = (image.height, image.width) if image.mode == "L" else (image.height, image.width, 3)
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        return None
    return pixels


def _reduction(image_size: tuple[int, int], size: int, gap: int = REDUCE_GAP) -> int:
    """The integer factor an image may be reduced by before resizing to ``size`` (1: none)."""
    return max(1, min(image_size) // (size * gap))


def to_model_input(pixels: Pixels, size: int) -> Image.Image:
    """``resize_for_model(_to_rgb(image), size)`` without holding the full-size RGB image."""
    if isinstance(pixels, np.ndarray):
        height, width = pixels.shape[:2]
        if pixels.ndim == 3 and _reduction((width, height), size) == 1 and (height, width) != (size, size):
            resized = _resize_colour(pixels, size)  # no Pillow copy of a decoded colour array
            if resized is not None:
                return resized
            return Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        pixels = Image.fromarray(pixels)
    image = pixels
    factor = _reduction(image.size, size)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8bit(image, factor)  # reduced in the same pass
    elif factor > 1 and image.mode in ("L", "RGB"):
        image = image.reduce(factor)
    if image.mode == "L":
        # Resizing L then copying it to three bands gives exactly the bands of resizing the RGB copy.
        return resize_for_model(image, size).convert("RGB")
    return resize_for_model(_to_rgb(image), size)


def load_image_file(path: str | Path, *, max_pixels: int = 64_000_000, size: int | None = None) -> Image.Image:
    """Read and decode an image file (at the model input ``size`` when given, see :func:`decode_image`);
    a missing file is a :class:`BadImageError` too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(str(path), f"cannot be read ({exc.strerror or exc})") from exc
    return decode_image(data, name=str(path), max_pixels=max_pixels, size=size)


def _to_8bit(image: Image.Image, factor: int = 1) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale stretched to 8 bits (L) over its own min..max range.

    Band by band, so the float copy is :data:`_ROWS_PER_BAND` rows, never the whole image; the values
    are those of the whole-image formula ``round((x - low) / (high - low) * 255)``. With ``factor`` > 1
    each band is also box-averaged ``factor`` × ``factor`` (what ``Image.reduce`` does, which Pillow has
    no 16-bit version of; trailing rows and columns short of a full box are dropped), so a huge 16-bit
    image never exists at full size in 8 bits either. Other modes pass unchanged.
    """
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    low, high = (float(value) for value in image.getextrema())
    width, height = image.size
    factor = max(1, min(factor, width, height))
    out_width, out_height = width // factor, height // factor
    out = np.zeros((out_height, out_width), dtype=np.uint8)
    if high > low:
        rows = max(1, _ROWS_PER_BAND // factor) * factor
        for top in range(0, out_height * factor, rows):
            bottom = min(out_height * factor, top + rows)
            band = np.array(image.crop((0, top, out_width * factor, bottom)), dtype=np.float64)
            if factor > 1:
                shape = ((bottom - top) // factor, factor, out_width, factor)
                band = band.reshape(shape).mean(axis=(1, 3))
            # In place, in the formula's order (so the rounding is the formula's): no band-sized temporaries.
            np.subtract(band, low, out=band)
            np.divide(band, high - low, out=band)
            np.multiply(band, 255.0, out=band)
            np.round(band, out=band)
            out[top // factor : bottom // factor] = band
    return Image.fromarray(out)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    image = _to_8bit(image)
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
    heatmap) get the same scores: an image already at the size passes through untouched. A colour image is
    resized by :func:`_resize_colour` where the CPU allows, anything gray (L, or RGB with equal bands) by
    Pillow.
    """
    if image.size == (image_size, image_size):
        return image
    if image.mode == "RGB" and _TORCH_RESIZES_LIKE_PILLOW:
        resized = _resize_colour(np.asarray(image), image_size)
        if resized is not None:
            return resized
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def _resize_colour(pixels: np.ndarray, image_size: int) -> Image.Image | None:
    """Pillow's antialiased bilinear resize of an ``(h, w, 3)`` uint8 colour image, by torch's uint8 kernel;
    None (the caller resizes with Pillow) for gray content, or where the CPU lacks the kernel.

    The kernel (a port of Pillow-SIMD's) is 3× faster than Pillow, which keeps RGB in 4 bytes a pixel and
    has no SIMD resize: 0.5 against 1.5 ms from the 512² Dacon PNGs to 224², the same pixels exactly. On
    other sizes it is at most one grey level from Pillow, on 0.1-4% of the pixels (its fixed-point weights
    round differently). So gray content, where Pillow's one-band resize is as fast, stays with Pillow:
    the labelled sets here are gray and are resized exactly as before, and a gray image stored as RGB gets
    exactly the pixels of its L decode. Not parallelised inside torch (wall = CPU time), so it never competes
    with the model's threads; it releases the GIL, as Pillow does. ``pixels`` is read as channels-last.
    """
    if not _TORCH_RESIZES_LIKE_PILLOW or _is_gray(pixels):
        return None
    if not pixels.flags.writeable:
        pixels = pixels.copy()  # torch will not wrap a read-only buffer
    batch = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        batch, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return Image.fromarray(resized[0].permute(1, 2, 0).numpy())


def _is_gray(pixels: np.ndarray) -> bool:
    """All three bands equal (a gray image stored as RGB); a colour image is told by its first row."""
    first = pixels[:1]
    if not (np.array_equal(first[..., 0], first[..., 1]) and np.array_equal(first[..., 1], first[..., 2])):
        return False
    return bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))


def to_batch(
    images: Sequence[Image.Image],
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Resize and normalise a batch: (n_images, 3, S, S) float32 on ``device`` (default the CPU),
    normalised in one vectorised step.

    For a GPU the pixels travel as uint8 from pinned memory without waiting (a quarter of float32's bytes)
    and become float32 there, so the worker's CPU does no float work per image. The float operations are
    the same on either side (a multiply, then a subtract, each correctly rounded), so the batch is
    bit-identical wherever it is normalised.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    if not images:
        return torch.empty(0, 3, image_size, image_size, device=target)
    if len(images) > 1 and any(img.size != (image_size, image_size) for img in images):
        # Pillow releases the GIL while resizing, so a batch resizes on every core.
        with ThreadPoolExecutor(max_workers=min(len(images), os.cpu_count() or 1)) as pool:
            resized = list(pool.map(lambda img: np.asarray(resize_for_model(img, image_size)), images))
    else:
        resized = [np.asarray(resize_for_model(img, image_size)) for img in images]
    pixels = np.stack(resized)
    # Channels first while still uint8 (a quarter of the bytes), then the same two float operations in
    # place: bit-identical to converting the strided view, 4.5× faster (1.0 → 0.22 ms per 224² image).
    channels_first = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    if target.type == "cuda":
        staged = torch.empty(channels_first.shape, dtype=torch.uint8, pin_memory=True)
        staged.copy_(channels_first)
        # Queued on the current stream, ahead of the float ops below; the caching host allocator keeps the
        # pinned block until the copy has run.
        batch = staged.to(target, non_blocking=True).float()
    else:
        batch = channels_first.contiguous().to(target).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=target).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32, device=target)
    return batch.mul_(scale).sub_(shift.view(1, 3, 1, 1))
