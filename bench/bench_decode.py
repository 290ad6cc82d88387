"""CPU per image of decoding and resizing to the model input, decoder by decoder, side by side.

Prints (not a test) the median thread CPU ms per image over interleaved rounds, in one process with the
worker's allocator settings (``return_large_buffers_to_the_os``, as ``score_batch`` runs), for:

* PNG decode of 512² Dacon training images: Pillow, Wuffs (pywuffs, checksums verified, as shipped),
  imagecodecs' libpng and libspng, torchvision's ``decode_png`` and OpenCV's ``imdecode`` (the last two
  only where installed), each checked to give Pillow's pixels;
* resize of the decoded RGB image to the input size: Pillow's bilinear and torch's uint8 kernel, with the
  largest difference in grey levels;
* the worker's whole decode-to-input path (``load_pixels`` + ``to_model_input``) as shipped against the
  Pillow-only path it replaced, for those PNGs and for 2048² JPEGs made from them (draft decode).

Usage: ``python bench/bench_decode.py [--images 60] [--rounds 7] [--size 224]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.images as images_module
from bench.common import dacon_train, jpeg_payloads
from models import png_decoders
from worker.decode_budget import return_large_buffers_to_the_os

Decoder = Callable[[bytes], np.ndarray]


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)


def _decoders() -> dict[str, Decoder]:
    decoders: dict[str, Decoder] = {"pillow": _pillow}
    wuffs = png_decoders._wuffs_decoder()
    if wuffs is not None:
        decoders["wuffs"] = lambda data: wuffs(data, False)
    try:
        import imagecodecs

        decoders["imagecodecs libpng"] = imagecodecs.png_decode
        decoders["imagecodecs libspng"] = imagecodecs.spng_decode
    except ImportError:
        pass
    try:
        from torchvision.io import decode_png

        decoders["torchvision"] = lambda data: (
            decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
        )
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        decoders["opencv"] = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    except ImportError:
        pass
    return decoders


def _cpu_ms(function: Callable[[object], object], items: list) -> float:
    """Thread CPU ms per item of one pass over ``items``."""
    started = time.thread_time()
    for item in items:
        function(item)
    return (time.thread_time() - started) / len(items) * 1000


def _interleaved(candidates: dict[str, Callable[[object], object]], items: list, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for function in candidates.values():  # warm-up
        function(items[0])
    for _ in range(rounds):
        for name, function in candidates.items():
            times[name].append(_cpu_ms(function, items))
    return {name: statistics.median(values) for name, values in times.items()}


def _pillow_only(data: bytes, size: int) -> Image.Image:
    """The decode-to-input path before the fast PNG decoder and the torch resize."""
    saved = (images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW)
    images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW = None, False
    try:
        return images_module.to_model_input(images_module.load_pixels(data, size=size), size)
    finally:
        images_module._png_decode, images_module._TORCH_RESIZES_LIKE_PILLOW = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", type=int, default=224, help="the model input size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    return_large_buffers_to_the_os()
    refs = sorted(dacon_train(), key=lambda ref: ref.id)[: args.images]
    payloads = [ref.path.read_bytes() for ref in refs]
    print(f"{len(payloads)} Dacon training PNGs, {Image.open(refs[0].path).size}, input {args.size}²")

    decoders = _decoders()
    reference = [_pillow(data) for data in payloads]
    same = {
        name: all(np.array_equal(decoder(data), ref) for data, ref in zip(payloads, reference, strict=True))
        for name, decoder in decoders.items()
    }
    decode_ms = _interleaved(dict(decoders), payloads, args.rounds)
    print("\nPNG decode, CPU ms per image")
    for name, ms in decode_ms.items():
        print(f"  {name:22s} {ms:6.2f}   {decode_ms['pillow'] / ms:4.2f}× Pillow   same pixels: {same[name]}")

    rgb = [Image.fromarray(array) for array in reference]
    resize = {
        "pillow bilinear": lambda image: image.resize((args.size, args.size), Image.Resampling.BILINEAR),
        "torch uint8": lambda image: images_module._resize_colour(np.asarray(image), args.size),
    }
    resize_ms = _interleaved(resize, rgb, args.rounds)
    worst = max(
        int(np.abs(np.asarray(resize["pillow bilinear"](i), int) - np.asarray(resize["torch uint8"](i), int)).max())
        for i in rgb
    )
    print(f"\nresize to {args.size}², CPU ms per image (largest difference: {worst} grey levels)")
    for name, ms in resize_ms.items():
        print(f"  {name:22s} {ms:6.2f}   {resize_ms['pillow bilinear'] / ms:4.2f}× Pillow")

    jpegs = jpeg_payloads(payloads[: max(1, len(payloads) // 2)], 2048)
    print("\nthe worker's decode-to-input path, CPU ms per image")
    for label, items in (("512² PNG", payloads), ("2048² JPEG", jpegs)):
        paths = {
            "Pillow only (before)": lambda data: _pillow_only(data, args.size),
            "shipped": lambda data: images_module.to_model_input(
                images_module.load_pixels(data, size=args.size), args.size
            ),
        }
        ms = _interleaved(paths, items, args.rounds)
        before, now = ms["Pillow only (before)"], ms["shipped"]
        print(
            f"  {label:11s} before {before:6.2f}   now {now:6.2f}   saved {before - now:5.2f} ms ({before / now:4.2f}×)"
        )


if __name__ == "__main__":
    main()
