"""Synthetic anomalies pasted into nominal images, for label-free validation of a config.

A user who brings only defect-free images still needs to know whether one config separates defects better
than another. Following CutPaste (Li et al., CVPR 2021) and DRAEM (Zavrtanik et al., ICCV 2021), defects are
made from the nominal images themselves:

- ``cutpaste``: a rectangle cut from the image (or a donor image), colour-jittered, pasted elsewhere;
- ``scar``: a thin, long rectangle cut the same way, rotated, pasted elsewhere;
- ``perlin``: inside a thresholded Perlin-noise blob, the image is blended with a strongly augmented other
  image (the donor, or the image itself rotated and flipped when there is none), as DRAEM does with textures.

Sizes follow real small defects: the footprint of a defect covers between ``scale / 30`` and ``scale`` of
the image area (log-uniform; ``scale`` = 3% by default), and at least 16 pixels.

Everything is seeded: the same image, seed and kind give the same pixels. The returned mask is *exactly*
the set of pixels whose value changed (any channel), so pixels outside it are bit-identical to the input;
an attempt that changes too little of its footprint (a patch of background pasted on background, common on
binary line art) is redrawn.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

#: Defect kinds :func:`synthesize_anomaly` can make.
SYNTHETIC_KINDS: tuple[str, ...] = ("cutpaste", "scar", "perlin")

DEFAULT_SCALE = 0.03
_MIN_FOOTPRINT = 16  # pixels
_MIN_CHANGED_FRACTION = 0.25  # of the footprint, else the attempt is redrawn
_ATTEMPTS = 12


@dataclass(frozen=True)
class SyntheticAnomaly:
    """One synthetic defect: the altered image and exactly which pixels changed."""

    id: str
    image: Image.Image
    mask: np.ndarray  # bool (H, W), exactly the changed pixels' region
    kind: str


def synthesize_anomaly(
    image: Image.Image,
    *,
    seed: int,
    kind: str | None = None,
    donor: Image.Image | None = None,
    scale: float = DEFAULT_SCALE,
) -> tuple[Image.Image, np.ndarray]:
    """Paste one synthetic defect into ``image`` (RGB in, RGB of the same size out) and return its mask.

    ``kind`` is one of :data:`SYNTHETIC_KINDS` (None: drawn from the seed). ``donor`` is another nominal
    image that cut-paste patches and Perlin blends take their content from (resized to ``image``'s size);
    without one, the image itself is the source. ``scale`` is the largest footprint as a fraction of the
    image area. Raises ``ValueError`` when no attempt changes enough pixels (a constant image).
    """
    if kind is not None and kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; choose one of {list(SYNTHETIC_KINDS)}")
    if not 0.0 < scale <= 0.5:
        raise ValueError(f"scale={scale} must be in (0, 0.5]: it is the largest defect area / image area")
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = SYNTHETIC_KINDS[int(rng.integers(len(SYNTHETIC_KINDS)))]
    original = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = original.shape[:2]
    if height < 8 or width < 8:
        raise ValueError(f"image of {width}x{height} pixels is too small for a synthetic defect (min 8x8)")
    source = original if donor is None else np.asarray(donor.convert("RGB").resize((width, height)), np.uint8)
    best: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(_ATTEMPTS):
        area = _draw_area(rng, height * width, scale)
        altered, footprint = _MAKERS[kind](original, source, area, rng)
        mask = np.any(altered != original, axis=-1)
        if best is None or mask.sum() > best[1].sum():
            best = (altered, mask)
        if mask.sum() >= max(4, _MIN_CHANGED_FRACTION * footprint.sum()):
            break
    altered, mask = best
    if not mask.any():
        raise ValueError(f"no {kind} defect changes this {width}x{height} image (is it constant?)")
    return Image.fromarray(altered, mode="RGB"), mask


def synthetic_anomalies(
    images: Sequence[Image.Image],
    ids: Sequence[str],
    *,
    seed: int,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    scale: float = DEFAULT_SCALE,
) -> list[SyntheticAnomaly]:
    """One synthetic defect per image, in input order, each determined by ``seed`` and its own id only.

    The kind is drawn from ``kinds`` by the image's seed. The donor of an image (for cut-paste and Perlin
    blends) is the other image that wins a hash of (seed, id, candidate id): adding images changes an image's
    donor only when a new image wins, and never depends on positions. The anomaly id is ``"{id}~{kind}"``.
    """
    if len(images) != len(ids):
        raise ValueError(f"got {len(images)} images but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    unknown = sorted(set(kinds) - set(SYNTHETIC_KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds={list(kinds)} must be a non-empty subset of {list(SYNTHETIC_KINDS)}")
    by_id = dict(zip(ids, images, strict=True))
    anomalies = []
    for image_id, image in zip(ids, images, strict=True):
        image_seed = derive_seed(seed, image_id)
        kind = kinds[image_seed % len(kinds)]
        donor_id = _donor_id(seed, image_id, ids)
        donor = by_id[donor_id] if donor_id is not None else None
        altered, mask = synthesize_anomaly(image, seed=image_seed, kind=kind, donor=donor, scale=scale)
        anomalies.append(SyntheticAnomaly(id=f"{image_id}~{kind}", image=altered, mask=mask, kind=kind))
    return anomalies


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from ``seed`` and a string key (sha256: the same on every OS and Python run)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _donor_id(seed: int, image_id: str, ids: Sequence[str]) -> str | None:
    candidates = [other for other in ids if other != image_id]
    if not candidates:
        return None
    return min(candidates, key=lambda other: (derive_seed(seed, f"donor:{image_id}:{other}"), other))


def _draw_area(rng: np.random.Generator, image_area: int, scale: float) -> int:
    """Footprint area in pixels, log-uniform in [scale/30, scale] of the image, at least _MIN_FOOTPRINT."""
    fraction = math.exp(rng.uniform(math.log(scale / 30.0), math.log(scale)))
    return max(_MIN_FOOTPRINT, round(fraction * image_area))


# ---------------------------------------------------------------------------------------------- the makers
def _cutpaste(
    original: np.ndarray, source: np.ndarray, area: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle (aspect 1:3 … 3:1) from ``source``, jittered, pasted at another place."""
    height, width = original.shape[:2]
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    patch_h = int(np.clip(round(math.sqrt(area * aspect)), 2, height - 1))
    patch_w = int(np.clip(round(area / patch_h), 2, width - 1))
    top, left = _corner(rng, height, width, patch_h, patch_w)
    patch = source[top : top + patch_h, left : left + patch_w]
    patch = _jitter(patch, rng)
    alpha = np.ones((patch_h, patch_w), dtype=bool)
    return _paste(original, patch, alpha, rng)


def _scar(
    original: np.ndarray, source: np.ndarray, area: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A thin rectangle (aspect 1:6 … 1:12) from ``source``, jittered, rotated by ±45°, pasted elsewhere."""
    height, width = original.shape[:2]
    aspect = rng.uniform(6.0, 12.0)
    scar_w = max(2, round(math.sqrt(area / aspect)))
    scar_l = max(4, round(scar_w * aspect))
    scar_l = min(scar_l, int(0.9 * min(height, width)))
    scar_w = min(scar_w, max(2, scar_l // 3))
    top, left = _corner(rng, height, width, scar_w, scar_l)
    patch = _jitter(source[top : top + scar_w, left : left + scar_l], rng)
    angle = rng.uniform(-45.0, 45.0) + (90.0 if rng.random() < 0.5 else 0.0)
    # NEAREST keeps pasted values and the alpha exactly aligned (no interpolated fringe).
    rotated = np.asarray(Image.fromarray(patch).rotate(angle, resample=Image.Resampling.NEAREST, expand=True))
    alpha_img = Image.fromarray(np.full(patch.shape[:2], 255, np.uint8))
    alpha = np.asarray(alpha_img.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)) > 0
    rotated, alpha = _fit(rotated, alpha, height, width)
    return _paste(original, rotated, alpha, rng)


def _perlin(
    original: np.ndarray, source: np.ndarray, area: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM: inside a thresholded Perlin blob, ``(1 - beta) * augmented source + beta * image``."""
    height, width = original.shape[:2]
    side_h = int(np.clip(round(math.sqrt(area) * 1.6), 4, height))
    side_w = int(np.clip(round(math.sqrt(area) * 1.6), 4, width))
    res = int(rng.choice([1, 2, 4]))
    noise = _perlin_noise(side_h, side_w, res, rng)
    # An elliptic taper keeps the blob inside its window, so a defect stays local.
    yy = (np.arange(side_h) + 0.5) / side_h * 2 - 1
    xx = (np.arange(side_w) + 0.5) / side_w * 2 - 1
    taper = 1.0 - (yy[:, None] ** 2 + xx[None, :] ** 2)
    blob = (noise + taper) > rng.uniform(0.6, 0.9)
    if not blob.any():
        blob[side_h // 2, side_w // 2] = True
    top = int(rng.integers(0, height - side_h + 1))
    left = int(rng.integers(0, width - side_w + 1))
    texture = _augment(source if rng.random() < 0.7 else _reorient(original, rng), rng)
    beta = rng.uniform(0.0, 0.6)
    window = (slice(top, top + side_h), slice(left, left + side_w))
    blended = (1.0 - beta) * texture[window].astype(np.float64) + beta * original[window].astype(np.float64)
    altered = original.copy()
    region = altered[window]
    region[blob] = np.clip(np.rint(blended[blob]), 0, 255).astype(np.uint8)
    footprint = np.zeros(original.shape[:2], dtype=bool)
    footprint[window] = blob
    return altered, footprint


_MAKERS = {"cutpaste": _cutpaste, "scar": _scar, "perlin": _perlin}


# ---------------------------------------------------------------------------------------------- helpers
def _corner(rng: np.random.Generator, height: int, width: int, patch_h: int, patch_w: int) -> tuple[int, int]:
    return int(rng.integers(0, height - patch_h + 1)), int(rng.integers(0, width - patch_w + 1))


def _paste(
    original: np.ndarray, patch: np.ndarray, alpha: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``patch`` where ``alpha`` at a random place; returns (altered, footprint)."""
    height, width = original.shape[:2]
    top, left = _corner(rng, height, width, *alpha.shape)
    altered = original.copy()
    window = (slice(top, top + alpha.shape[0]), slice(left, left + alpha.shape[1]))
    region = altered[window]
    region[alpha] = patch[alpha]
    footprint = np.zeros(original.shape[:2], dtype=bool)
    footprint[window] = alpha
    return altered, footprint


def _fit(patch: np.ndarray, alpha: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop a rotated patch to the image size (centred) when rotation made it larger than the image."""
    ph, pw = alpha.shape
    top, left = max(0, (ph - height) // 2), max(0, (pw - width) // 2)
    return patch[top : top + height, left : left + width], alpha[top : top + height, left : left + width]


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CutPaste's colour jitter: contrast and brightness changed by 10–40%, shifted away from saturation
    so that even black-and-white line art gets a visible change."""
    values = patch.astype(np.float64)
    mean = values.mean()
    contrast = 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.4)
    shift = rng.uniform(0.1, 0.4) * 255.0 * (-1.0 if mean > 127.5 else 1.0)
    return np.clip(np.rint((values - mean) * contrast + mean + shift), 0, 255).astype(np.uint8)


def _augment(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of DRAEM's texture augmentations, so the blend differs from the nominal appearance."""
    image = Image.fromarray(texture)
    choice = int(rng.integers(5))
    if choice == 0:
        image = ImageOps.invert(image)
    elif choice == 1:
        image = ImageOps.solarize(image, threshold=int(rng.integers(32, 224)))
    elif choice == 2:
        image = ImageOps.posterize(image, bits=int(rng.integers(1, 4)))
    elif choice == 3:
        image = ImageOps.equalize(image)
    else:
        return _jitter(texture, rng)
    return np.asarray(image)


def _reorient(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image rotated by a multiple of 90° and flipped, cropped/tiled back to its own size."""
    turned = np.rot90(image, k=int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        turned = turned[:, ::-1]
    height, width = image.shape[:2]
    reps = (math.ceil(height / turned.shape[0]), math.ceil(width / turned.shape[1]), 1)
    return np.ascontiguousarray(np.tile(turned, reps)[:height, :width])


def _perlin_noise(height: int, width: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``res`` × ``res`` cells over a height × width grid, roughly in [-1, 1]."""
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(res + 1, res + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(height) + 0.5) / height * res
    x = (np.arange(width) + 0.5) / width * res
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        grad = gradients[yi[:, None] + dy, xi[None, :] + dx]
        return grad[..., 0] * (yf - dy) + grad[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(yf), fade(xf)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return math.sqrt(2.0) * (top * (1 - u) + bottom * u)
