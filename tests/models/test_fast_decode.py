"""The fast decode-to-input path (Wuffs or libspng for plain PNGs, torch's uint8 resize) against Pillow's.

Each test compares the shipped path with the Pillow-only path it replaced (``_png_decode`` and
``_TORCH_RESIZES_LIKE_PILLOW`` switched off in the same process), so a difference in pixels or in what is
reported for a broken file shows up as a failure. The broken-file tests run once per installed decoder.
"""

from __future__ import annotations

import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import models.images as images_module
from models import BadImageError, decode_image, png_decoders
from models.datasets import read_image_csv
from models.images import load_pixels, resize_for_model, to_model_input
from tests.models.png_files import png_file

pytestmark = pytest.mark.skipif(images_module._png_decode is None, reason="no fast PNG decoder is installed")

#: Every fast decoder installed here, by name (the first is the one the product uses).
DECODERS = {
    name: decoder
    for name, decoder in (("wuffs", png_decoders._wuffs_decoder()), ("libspng", png_decoders._spng_decoder()))
    if decoder is not None
}


@pytest.fixture(params=sorted(DECODERS))
def each_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with ``load_pixels`` using one installed decoder after the other."""
    monkeypatch.setattr(images_module, "_png_decode", DECODERS[request.param])
    return str(request.param)


def _png(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def _outcome(data: bytes, size: int | None, *, fast: bool) -> tuple[str, bytes | str]:
    """What ``decode_image`` gives (pixels or the error message) with the fast paths on, or Pillow only."""
    saved = (images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW)
    if not fast:
        images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW = None, False
    try:
        return "image", np.asarray(decode_image(data, size=size)).tobytes()
    except BadImageError as exc:
        return "error", str(exc)
    finally:
        images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW = saved


@pytest.fixture
def dacon_train_pngs(dacon_data: Path) -> list[bytes]:
    refs = sorted(read_image_csv(dacon_data / "train.csv"), key=lambda ref: ref.id)[:12]
    return [ref.path.read_bytes() for ref in refs]


def test_the_product_decodes_with_wuffs_where_it_is_installed() -> None:
    """Wuffs first, libspng where pywuffs (the fast-png extra, built from source) is missing; CI installs the
    extra and says so (``WAFERWATCH_TEST_REQUIRE_WUFFS=1``), so there its absence is a failure."""
    assert next(iter(DECODERS)) == png_decoders.PNG_DECODER
    if os.environ.get("WAFERWATCH_TEST_REQUIRE_WUFFS") == "1":
        assert "wuffs" in DECODERS, "pywuffs did not install (make install: the fast-png extra needs a C++ compiler)"


def test_plain_pngs_take_the_fast_decoder_and_give_pillows_pixels(
    dacon_train_pngs: list[bytes], each_decoder: str
) -> None:
    rng = np.random.default_rng(4)
    gray = _png(Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)))
    for data in [*dacon_train_pngs, gray]:
        pixels = load_pixels(data)
        assert isinstance(pixels, np.ndarray), f"a plain 8-bit PNG is decoded by {each_decoder}"
        with Image.open(io.BytesIO(data)) as reference:
            assert np.array_equal(pixels, np.asarray(reference))


def test_the_dacon_images_reach_the_model_input_exactly_as_pillow_made_it(dacon_train_pngs: list[bytes]) -> None:
    for data in dacon_train_pngs:
        assert _outcome(data, 224, fast=True) == _outcome(data, 224, fast=False)


@pytest.mark.parametrize("kind", ["palette", "sixteen-bit-rgb", "rgba", "gray-with-trns", "two-bit-gray"])
def test_other_pngs_are_left_to_pillow(kind: str) -> None:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    if kind == "palette":
        data = _png(rgb.convert("P"))
    elif kind == "rgba":
        data = _png(rgb.convert("RGBA"))
    elif kind == "gray-with-trns":
        data = _png(rgb.convert("L"), transparency=7)
    elif kind == "two-bit-gray":
        data = _png(rgb.convert("L"), bits=2)
    else:
        data = _sixteen_bit_rgb_png(rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16))
    pixels = load_pixels(data)
    assert isinstance(pixels, Image.Image), f"{kind} must be decoded by Pillow"
    assert _outcome(data, None, fast=True) == _outcome(data, None, fast=False)


def _sixteen_bit_rgb_png(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): filter 0 on every row."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return png_file(width, height, bit_depth=16, colour_type=2, rows=rows)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_truncated_or_corrupted_pngs_end_as_pillow_ends_them(mode: str, each_decoder: str) -> None:
    """The decoder refusing a file hands it to Pillow: the recorded outcome (pixels or error) is Pillow's.
    A flipped byte in the compressed data must be refused (Wuffs' checksums are on), never decoded."""
    rng = np.random.default_rng(6)
    shape = (120, 100, 3) if mode == "RGB" else (120, 100)
    data = _png(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
    broken = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 60))]
    broken += [data[:-1], data[:-12]]
    for position in range(40, len(data) - 20, max(1, len(data) // 25)):
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        broken.append(bytes(flipped))
    outcomes = [(_outcome(item, None, fast=True), _outcome(item, None, fast=False)) for item in broken]
    assert all(fast == slow for fast, slow in outcomes)
    assert any(fast[0] == "error" for fast, _ in outcomes), "the cases include files Pillow refuses"


def test_a_gamma_or_srgb_chunk_changes_nothing(each_decoder: str) -> None:
    """The decoders apply no gamma unless asked, like Pillow: the stored samples are the pixels."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for chunk, body in ((b"gAMA", struct.pack(">I", 100000)), (b"sRGB", b"\x00")):
        info = PngImagePlugin.PngInfo()
        info.add(chunk, body)
        data = _png(image, pnginfo=info)
        pixels = load_pixels(data)
        assert isinstance(pixels, np.ndarray)
        assert np.array_equal(pixels, np.asarray(image))


@pytest.mark.skipif(not images_module._TORCH_RESIZES_LIKE_PILLOW, reason="no AVX2: Pillow resizes everything")
def test_the_torch_resize_is_at_most_one_grey_level_from_pillows() -> None:
    rng = np.random.default_rng(8)
    for height, width, size in ((700, 900, 224), (300, 280, 224), (100, 60, 224), (640, 640, 320)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = np.asarray(resize_for_model(image, size), dtype=int)
        pillows = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=int)
        difference = np.abs(ours - pillows)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.05


@pytest.mark.parametrize("size", [(700, 900), (333, 517), (120, 90), (2000, 1800)])
def test_gray_images_reach_the_input_exactly_as_before(size: tuple[int, int]) -> None:
    """Every labelled set here is gray: Pillow still resizes gray content, so their figures stand. A gray
    image stored as RGB (equal bands) gets exactly the pixels of its L decode, and so does its full-size
    decode resized later (what calibration and the label-free check score)."""
    rng = np.random.default_rng(9)
    gray = Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))
    as_l, as_rgb = _png(gray), _png(gray.convert("RGB"))
    jpeg = io.BytesIO()
    gray.save(jpeg, format="JPEG", quality=90)
    for data in (as_l, as_rgb, jpeg.getvalue()):
        assert _outcome(data, 224, fast=True) == _outcome(data, 224, fast=False)
    assert _outcome(as_l, 224, fast=True) == _outcome(as_rgb, 224, fast=True)
    if min(size) < 4 * 224:  # no reduction first (above it the full-size path resizes unreduced, as before)
        reference = np.asarray(to_model_input(load_pixels(as_l, size=224), 224))
        assert np.array_equal(np.asarray(resize_for_model(decode_image(as_rgb), 224)), reference)


def test_a_colour_image_with_one_gray_row_is_still_colour() -> None:
    rng = np.random.default_rng(10)
    pixels = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    pixels[0] = pixels[0, :, :1]  # a gray first row
    assert not images_module._is_gray(pixels)
    assert images_module._is_gray(np.repeat(pixels[..., :1], 3, axis=2))


def test_threads_decoding_at_once_each_get_their_own_pixels(dacon_train_pngs: list[bytes]) -> None:
    """The worker decodes on eight fetch threads: a Wuffs decoder shared between threads crashes the
    process, so each thread must keep its own."""
    expected = [np.asarray(Image.open(io.BytesIO(data))) for data in dacon_train_pngs]

    def decode_all(_: int) -> bool:
        return all(
            np.array_equal(png_decoders.decode_plain_png(data, False), want)
            for data, want in zip(dacon_train_pngs * 3, expected * 3, strict=True)
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(decode_all, range(4)))
