"""Plain 8-bit PNGs decoded by the fastest checked decoder installed: Wuffs, else libspng, else none.

Inflating and unfiltering is most of the CPU a worker spends on a PNG outside the model. Measured on the
512² Dacon PNGs in one process (``bench/bench_decode.py``): Wuffs (through pywuffs) 2.5 ms, libspng
(through imagecodecs) 3.7, Pillow 4.2-5.2. Both release the GIL. Wuffs is Google's memory-safe decoder
library (its bounds checks are proved at compile time), which suits bytes that arrive from the network.

Two details make Wuffs give Pillow's answers:

* its ``aux`` API ignores the zlib and chunk checksums unless told otherwise, so a corrupted file would
  decode to wrong pixels where Pillow reports it; :data:`IGNORE_CHECKSUM` is set to 0 on every decoder.
* a decoder object is not thread-safe (two threads on one segfault): each thread keeps its own.

Callers hand over only the plain case (one frame, not interlaced, no transparency chunk, 8 bits a sample)
and treat any exception as "let Pillow decode it": what is recorded for a file (pixels or error) stays
Pillow's. PNG is lossless, so the pixels are the same (``tests/models/test_fast_decode.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

__all__ = ["PNG_DECODER", "decode_plain_png"]

#: ``decode(data, gray)``: the ``(h, w)`` (gray) or ``(h, w, 3)`` uint8 pixels, or an exception.
PlainPngDecoder = Callable[[bytes, bool], np.ndarray]


def _wuffs_decoder() -> PlainPngDecoder | None:
    try:
        from pywuffs import ImageDecoderQuirks, ImageDecoderType, PixelFormat
        from pywuffs.aux import ImageDecoder, ImageDecoderConfig
    except ImportError:
        return None
    local = threading.local()

    def decoder_for(gray: bool) -> ImageDecoder:
        name = "gray" if gray else "rgb"
        decoder = getattr(local, name, None)
        if decoder is None:
            config = ImageDecoderConfig()
            config.enabled_decoders = [ImageDecoderType.PNG]
            config.pixel_format = PixelFormat.Y if gray else PixelFormat.RGB
            config.quirks = {ImageDecoderQuirks.IGNORE_CHECKSUM: 0}  # verify CRC-32 and Adler-32, as Pillow does
            decoder = ImageDecoder(config)
            setattr(local, name, decoder)
        return decoder

    def decode(data: bytes, gray: bool) -> np.ndarray:
        result = decoder_for(gray).decode(data)
        if result.error_message:
            raise ValueError(f"wuffs: {result.error_message}")
        pixels = result.pixbuf
        return pixels.reshape(pixels.shape[:2]) if gray else pixels

    return decode


def _spng_decoder() -> PlainPngDecoder | None:
    try:
        from imagecodecs import spng_decode
    except ImportError:
        return None
    return lambda data, gray: spng_decode(data)


def _first_available() -> tuple[str | None, PlainPngDecoder | None]:
    for name, make in (("wuffs", _wuffs_decoder), ("libspng", _spng_decoder)):
        decoder = make()
        if decoder is not None:
            return name, decoder
    return None, None


#: Which decoder :func:`decode_plain_png` uses (None: none is installed; Pillow decodes every PNG).
PNG_DECODER, _DECODE = _first_available()


def decode_plain_png(data: bytes, gray: bool) -> np.ndarray:
    """The pixels of a plain 8-bit PNG: ``(h, w)`` when ``gray``, else ``(h, w, 3)`` RGB.

    Raises:
        RuntimeError: no fast decoder is installed (:data:`PNG_DECODER` is None).
        Exception: the decoder refused the file (truncated, a bad checksum ...); Pillow decides.
    """
    if _DECODE is None:
        raise RuntimeError("no fast PNG decoder is installed (pywuffs or imagecodecs)")
    return _DECODE(data, gray)
